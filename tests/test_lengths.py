"""Variable lengths (SPEC "Variable lengths") in the ops: every cell, both directions, the attention cell
over self and external memory, against the reference that runs each row alone over its valid steps."""

import pytest
import torch

from rnnattn_ext import _ops, functional, reference

from conftest import device_params
from helpers import (CELLS, NUM_STATES, assert_accuracy_rule, assert_close, attention_args, gradcheck_layer, grads,
                     layer_args, loss_of, op_weights, proj)

TOLERANCES = {torch.float64: (1e-10, 1e-9), torch.float32: (2e-5, 1e-4)}

# Unsorted, with the shortest (1) and the longest (T) lengths, and a repeat.
LENGTHS_7 = [3, 7, 1, 5, 7, 2]


def _lengths(values, device):
    return torch.tensor(values, dtype=torch.int64, device=device)


def _probes(gen, tensors):
    return [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t) for t in tensors]


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("cell", CELLS)
def test_layer_with_lengths_matches_reference(cell, reverse, dtype, device):
    gen = torch.Generator().manual_seed(11)
    x, states, w_ih, w_hh, b_ih, b_hh = layer_args(cell, 7, len(LENGTHS_7), 4, 9, dtype, device, generator=gen)
    lengths = _lengths(LENGTHS_7, device)
    out, finals = functional.layer(cell, x, states, w_ih, w_hh, b_ih, b_hh, reverse=reverse, lengths=lengths)
    ref_out, ref_finals = reference.layer(cell, x, states, w_ih, w_hh, b_ih, b_hh, reverse=reverse,
                                          lengths=lengths.cpu())
    atol, rtol = TOLERANCES[dtype]
    assert_close(out, ref_out, atol, rtol, "output")
    for i, (f, rf) in enumerate(zip(finals, ref_finals)):
        assert_close(f, rf, atol, rtol, f"final state {i}")
    # Padded steps are exactly zero, not merely small.
    padded = torch.arange(7, device=device).unsqueeze(1) >= lengths.unsqueeze(0)
    assert torch.count_nonzero(out[padded]) == 0
    probes = _probes(gen, [out, *finals])
    inputs = [x, *states, w_ih, w_hh, b_ih, b_hh]
    ours = grads(loss_of(out, finals, probes), inputs)
    theirs = grads(loss_of(ref_out, ref_finals, probes), inputs)
    for name, a, b in zip(["input", *[f"state{i}" for i in range(len(states))], "w_ih", "w_hh", "b_ih", "b_hh"],
                          ours, theirs):
        assert_close(a, b, atol * 10, rtol * 10, f"grad of {name}")
    # Padded steps of the input get no gradient.
    assert torch.count_nonzero(ours[0][padded]) == 0


@pytest.mark.parametrize("order", ["unsorted", "longest_first"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_long_batch_with_lengths_float32(cell, reverse, order):
    # The CPU engine's chunked GEMMs, packed kernels and several thread blocks (B=64, H=384: 45 steps
    # cross chunk edges) with rows ending everywhere, under the SPEC accuracy rule. Longest first (a
    # PackedSequence's order), the recurrent GEMMs shrink to the rows still running.
    gen = torch.Generator().manual_seed(12)
    steps, batch = 45, 64
    inputs = list(layer_args(cell, steps, batch, 16, 384, torch.float32, generator=gen))
    x, states, rest = inputs[0], inputs[1], inputs[2:]
    lengths = torch.randint(1, steps + 1, (batch,), generator=gen)
    lengths[:3] = torch.tensor([1, steps, steps - 1])
    if order == "longest_first":
        lengths = lengths.sort(descending=True).values
    flat = [x, *states, *rest]
    n = len(states)
    probes = None

    def evaluate(impl, args):
        nonlocal probes
        out, finals = impl.layer(cell, args[0], args[1 : 1 + n], *args[1 + n :], reverse=reverse, lengths=lengths)
        if probes is None:
            probes = _probes(gen, [out.double(), *(f.double() for f in finals)])
        loss = loss_of(out.double(), [f.double() for f in finals], probes)
        return [out.detach(), *(f.detach() for f in finals), *grads(loss, args)]

    exact_inputs = [t.detach().double().requires_grad_() for t in flat]
    exact = evaluate(reference, exact_inputs)
    ours, eager = evaluate(functional, flat), evaluate(reference, flat)
    for i, (a, b, e) in enumerate(zip(ours, eager, exact)):
        assert_accuracy_rule(a, b, e, f"result {i}")


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("cell", CELLS)
def test_gradcheck_with_lengths(cell, device):
    gen = torch.Generator().manual_seed(13)
    x, states, w_ih, w_hh, b_ih, b_hh = layer_args(cell, 4, 3, 3, 4, torch.float64, device, generator=gen)
    gradcheck_layer(cell, x, states, (w_ih, w_hh, b_ih, b_hh), _lengths([2, 4, 1], device))


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("cell", CELLS)
def test_opcheck_with_lengths(cell, device):
    gen = torch.Generator().manual_seed(14)
    x, states, w_ih, w_hh, b_ih, b_hh = layer_args(cell, 5, 3, 3, 4, torch.float32, device, requires_grad=True,
                                                   generator=gen)
    lengths = _lengths([5, 2, 1], device)
    for reverse in (False, True):
        forward_args = (x, *states, w_ih, w_hh, b_ih, b_hh, *proj(cell), lengths, reverse, True)
        torch.library.opcheck(_ops.forward_op(cell), forward_args)
        with torch.no_grad():
            out, *finals, workspace = _ops.forward_op(cell)(*forward_args)
        plain = [t.detach() for t in (x, *states, w_ih, w_hh)]
        torch.library.opcheck(
            _ops.backward_op(cell),
            (torch.randn_like(out), *[torch.randn_like(f) for f in finals], *plain, *proj(cell), out, workspace,
             lengths, reverse),
        )


@pytest.mark.parametrize("cell", CELLS)
def test_full_lengths_equal_no_lengths(cell):
    # lengths = T everywhere is the plain layer, bit for bit.
    gen = torch.Generator().manual_seed(15)
    x, states, w_ih, w_hh, b_ih, b_hh = layer_args(cell, 6, 4, 3, 8, torch.float32, generator=gen)
    for reverse in (False, True):
        plain = functional.layer(cell, x, states, w_ih, w_hh, b_ih, b_hh, reverse=reverse)
        full = functional.layer(cell, x, states, w_ih, w_hh, b_ih, b_hh, reverse=reverse,
                                lengths=torch.full((4,), 6, dtype=torch.int64))
        assert torch.equal(plain[0], full[0])
        for a, b in zip(plain[1], full[1]):
            assert torch.equal(a, b)


def test_lengths_errors_name_the_argument():
    x, states, w_ih, w_hh, b_ih, b_hh = layer_args("gru", 5, 3, 3, 4, torch.float32, requires_grad=False)

    def call(lengths):
        return functional.layer("gru", x, states, w_ih, w_hh, b_ih, b_hh, lengths=lengths)

    with pytest.raises(ValueError, match=r"lengths must lie in \[1, T\] = \[1, 5\], got values in \[0, 5\]"):
        call(torch.tensor([0, 5, 2]))
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, T\] = \[1, 5\], got values in \[2, 6\]"):
        call(torch.tensor([6, 5, 2]))
    with pytest.raises(TypeError, match="lengths must be int64, got Float"):
        call(torch.tensor([1.0, 5.0, 2.0]))
    with pytest.raises(TypeError, match="lengths must be int64, got Int"):
        call(torch.tensor([1, 5, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"lengths must have shape \(B,\) = \[3\], got \[2\]"):
        call(torch.tensor([1, 5]))


# ---- the attention-augmented cell ----

# (memory slots or self, window, external memory lengths): an external memory with and without its
# own lengths (without them, a reverse row that starts late once skipped memory slots).
ATTENTION_CASES = [(None, None, None), (None, 1, None), (None, 3, None), (4, None, [2, 4, 1, 3, 4, 1]),
                   (4, None, None)]


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("memory,window,memory_lengths", ATTENTION_CASES,
                         ids=["self", "self-w1", "self-w3", "external", "external-all-slots"])
@pytest.mark.parametrize("cell", CELLS)
def test_attention_with_lengths_matches_reference(cell, memory, window, memory_lengths, reverse, device):
    gen = torch.Generator().manual_seed(16)
    batch = len(LENGTHS_7)
    x, states, weights, mem = attention_args(cell, 7, batch, 3, 8, 2, 4, memory, device=device, generator=gen)
    lengths = _lengths(LENGTHS_7, device)
    mem_lengths = _lengths(memory_lengths, device) if memory_lengths else None
    out, finals, context, attention = functional.attention_layer(
        cell, x, states, weights, 2, window, mem, mem_lengths, reverse=reverse, need_weights=True, lengths=lengths)
    ref = reference.attention_layer(cell, x, states, *weights, 2, window, mem, mem_lengths, reverse=reverse,
                                    lengths=lengths)
    atol, rtol = TOLERANCES[torch.float64]
    assert_close(out, ref[0], atol, rtol, "output")
    for i, (f, rf) in enumerate(zip(finals, ref[1])):
        assert_close(f, rf, atol, rtol, f"final state {i}")
    assert_close(context, ref[2], atol, rtol, "context")
    assert_close(attention, ref[3], atol, rtol, "attention weights")
    inputs = [t for t in (x, *states, *weights, mem) if t is not None]
    probes = _probes(gen, [out, *finals])
    context_probe = torch.randn(context.shape, generator=gen, dtype=torch.float64).to(context)
    ours = grads(loss_of(out, finals, probes) + (context * context_probe).sum(), inputs)
    theirs = grads(loss_of(ref[0], ref[1], probes) + (ref[2] * context_probe).sum(), inputs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert_close(a, b, atol * 10, rtol * 10, f"gradient {i}")


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("memory", [None, 3], ids=["self", "external"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_attention_gradcheck_and_opcheck_with_lengths(cell, memory, device):
    gen = torch.Generator().manual_seed(17)
    x, states, weights, mem = attention_args(cell, 4, 3, 2, 4, 2, 2, memory, device=device, generator=gen)
    lengths = _lengths([2, 4, 1], device)
    mem_lengths = _lengths([3, 1, 2], device) if memory else None
    n = NUM_STATES[cell]
    window = None if memory else 2
    for reverse in (False, True):

        def fn(x, *rest, reverse=reverse):
            out, finals, context, _ = functional.attention_layer(
                cell, x, list(rest[:n]), rest[n : n + 11], 2, window, rest[n + 11] if memory else None, mem_lengths,
                reverse=reverse, lengths=lengths)
            return (out, *finals, context)

        assert torch.autograd.gradcheck(fn, (x, *states, *weights, *([mem] if memory else [])))
        torch.library.opcheck(_ops.attention_forward_op(cell),
                              (x, *states, *op_weights(cell, weights), mem, mem_lengths, lengths, None, None, 2, window,
                               reverse, True, True))
