"""CUDA-only behaviour: 16-bit dtypes under the SPEC's accuracy rule, streams, device placement."""

import pytest
import torch

from rnnattn_ext import functional, reference

from helpers import CELLS, grads, layer_args, loss_of

pytestmark = pytest.mark.cuda


def _max_error(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("cell", CELLS)
def test_half_precision_accuracy_rule(cell, dtype):
    # SPEC: error against float64 at most 2x that of the same-dtype eager reference, plus 1e-6.
    gen = torch.Generator().manual_seed(10)
    args64 = layer_args(cell, 16, 4, 24, 32, torch.float64, "cuda", generator=gen)
    x, states, w_ih, w_hh, b_ih, b_hh = args64

    def cast(t):
        return None if t is None else t.detach().to(dtype).requires_grad_(True)

    low = [cast(x), [cast(s) for s in states], cast(w_ih), cast(w_hh), cast(b_ih), cast(b_hh)]
    exact_out, exact_finals = reference.layer(cell, x, states, w_ih, w_hh, b_ih, b_hh)
    eager_out, eager_finals = reference.layer(cell, low[0], low[1], *low[2:])
    ours_out, ours_finals = functional.layer(cell, low[0], low[1], *low[2:])
    assert ours_out.dtype == dtype
    weights = [torch.randn(exact_out.shape, generator=gen, dtype=torch.float64).cuda()] + [
        torch.randn(f.shape, generator=gen, dtype=torch.float64).cuda() for f in exact_finals
    ]
    flat_low = [low[0], *low[1], *low[2:]]
    flat_exact = [x, *states, w_ih, w_hh, b_ih, b_hh]
    exact_grads = grads(loss_of(exact_out, exact_finals, weights), flat_exact)
    eager_grads = grads(loss_of(eager_out, eager_finals, [w.to(dtype) for w in weights]), flat_low)
    ours_grads = grads(loss_of(ours_out, ours_finals, [w.to(dtype) for w in weights]), flat_low)
    pairs = [("output", exact_out, eager_out, ours_out)]
    pairs += [(f"final{i}", e, g, o) for i, (e, g, o) in enumerate(zip(exact_finals, eager_finals, ours_finals))]
    pairs += [(f"grad{i}", e, g, o) for i, (e, g, o) in enumerate(zip(exact_grads, eager_grads, ours_grads))]
    for name, exact, eager, ours in pairs:
        assert torch.isfinite(ours).all(), name
        allowed = 2 * _max_error(eager, exact) + 1e-6
        assert _max_error(ours, exact) <= allowed, f"{name}: error {_max_error(ours, exact)} > allowed {allowed}"


@pytest.mark.parametrize("cell", CELLS)
def test_runs_on_the_current_stream(cell):
    gen = torch.Generator().manual_seed(11)
    x, states, w_ih, w_hh, b_ih, b_hh = layer_args(cell, 32, 8, 64, 128, torch.float32, "cuda", generator=gen)
    expected, _ = functional.layer(cell, x, states, w_ih, w_hh, b_ih, b_hh)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out, finals = functional.layer(cell, x, states, w_ih, w_hh, b_ih, b_hh)
        loss = out.square().sum()
        g = grads(loss, [x, w_hh])
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    assert torch.equal(out, expected)
    ref_g = grads(expected.square().sum(), [x, w_hh])
    for a, b in zip(g, ref_g):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cell", CELLS)
def test_cuda_bitwise_deterministic(cell):
    gen = torch.Generator().manual_seed(12)
    x, states, w_ih, w_hh, b_ih, b_hh = layer_args(cell, 20, 16, 32, 96, torch.float32, "cuda", generator=gen)
    inputs = [x, *states, w_ih, w_hh, b_ih, b_hh]
    runs = []
    for _ in range(2):
        out, finals = functional.layer(cell, x, states, w_ih, w_hh, b_ih, b_hh, reverse=True)
        runs.append([out, *finals, *grads(out.square().sum() + sum(f.sum() for f in finals), inputs)])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_mixed_devices_are_rejected():
    x, states, w_ih, w_hh, b_ih, b_hh = layer_args("lstm", 3, 2, 4, 5, torch.float32, "cuda")
    with pytest.raises(ValueError, match="weight_hh must be on the device of input"):
        functional.layer("lstm", x, states, w_ih, w_hh.detach().cpu(), b_ih, b_hh)
    with pytest.raises(ValueError, match=r"lengths must be on the device of input \(cuda:0\), got cpu"):
        functional.layer("lstm", x, states, w_ih, w_hh, b_ih, b_hh, lengths=torch.tensor([3, 1]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("cell", CELLS)
def test_half_precision_with_lengths(cell, dtype):
    # Held rows in the 16-bit kernels: the same results as float32 rounded, padded steps exactly zero.
    gen = torch.Generator().manual_seed(9)
    x, states, w_ih, w_hh, b_ih, b_hh = layer_args(cell, 9, 5, 6, 16, torch.float32, "cuda", generator=gen)
    lengths = torch.tensor([9, 1, 4, 7, 2], device="cuda")
    for reverse in (False, True):
        wide, wide_finals = functional.layer(cell, x, states, w_ih, w_hh, b_ih, b_hh, reverse=reverse,
                                             lengths=lengths)
        low = [t.detach().to(dtype) for t in (x, *states, w_ih, w_hh, b_ih, b_hh)]
        n = len(states)
        out, finals = functional.layer(cell, low[0], low[1 : 1 + n], *low[1 + n :], reverse=reverse,
                                       lengths=lengths)
        padded = torch.arange(9, device="cuda").unsqueeze(1) >= lengths.unsqueeze(0)
        assert torch.count_nonzero(out[padded]) == 0
        tolerance = 2e-2 if dtype == torch.float16 else 8e-2
        assert _max_error(out, wide) < tolerance
        for f, w in zip(finals, wide_finals):
            assert _max_error(f, w) < tolerance


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=["f64", "f32", "f16", "bf16"])
@pytest.mark.parametrize("memory", [None, 7], ids=["self", "external"])
@pytest.mark.parametrize("cell", CELLS)
def test_attention_cell_on_cuda(cell, memory, dtype):
    # The attention cell's CUDA path against the reference: float64 to tight tolerance, the others
    # under the SPEC accuracy rule (see test_attention_ops._compare).
    from test_attention_ops import _compare

    _compare(cell, dtype, "cuda", steps=24, batch=3, hidden=32, heads=2, head_dim=8,
             window=None if memory else 5, memory_slots=memory, padded=memory is not None)
