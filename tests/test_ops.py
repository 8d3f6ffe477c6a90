"""torch.ops.rnnattn.* against the pure-PyTorch reference: values, final states and every gradient."""

import pytest
import torch

from rnnattn_ext import _ops, functional, reference

from conftest import device_params
from helpers import (CELLS, NUM_STATES, assert_accuracy_rule, assert_close, gradcheck_layer, grads, layer_args, loss_of,
                     proj, strided)

TOLERANCES = {torch.float64: (1e-10, 1e-9), torch.float32: (2e-5, 1e-4)}


def _compare_layer(cell, dtype, device, steps, batch, input_size, hidden, bias, reverse, seed=0, accuracy_rule=False):
    """Ours against the reference on the same inputs: elementwise tolerances, or with accuracy_rule (float32)
    the SPEC's rule against the float64 reference."""
    gen = torch.Generator().manual_seed(seed)
    x, states, w_ih, w_hh, b_ih, b_hh = layer_args(cell, steps, batch, input_size, hidden, dtype, device, bias,
                                                   generator=gen)
    if accuracy_rule:
        _compare_by_accuracy_rule(cell, reverse, gen, [x, *states, w_ih, w_hh, b_ih, b_hh], len(states))
        return
    out, finals = functional.layer(cell, x, states, w_ih, w_hh, b_ih, b_hh, reverse=reverse)
    ref_out, ref_finals = reference.layer(cell, x, states, w_ih, w_hh, b_ih, b_hh, reverse=reverse)
    atol, rtol = TOLERANCES[dtype]
    assert_close(out, ref_out, atol, rtol, "output")
    for i, (f, rf) in enumerate(zip(finals, ref_finals)):
        assert_close(f, rf, atol, rtol, f"final state {i}")
    weights = [torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out)] + [
        torch.randn(f.shape, generator=gen, dtype=torch.float64).to(f) for f in finals
    ]
    inputs = [x, *states, w_ih, w_hh, b_ih, b_hh]
    ours = grads(loss_of(out, finals, weights), inputs)
    theirs = grads(loss_of(ref_out, ref_finals, weights), inputs)
    names = ["input"] + [f"state{i}" for i in range(len(states))] + ["weight_ih", "weight_hh", "bias_ih", "bias_hh"]
    names = [n for n, t in zip(names, inputs) if t is not None]
    for name, a, b in zip(names, ours, theirs):
        assert_close(a, b, atol * 10, rtol * 10, f"grad of {name}")


def _compare_by_accuracy_rule(cell, reverse, gen, inputs, num_states):
    def evaluate(impl, args):
        x, *rest = args
        out, finals = impl.layer(cell, x, rest[:num_states], *rest[num_states:], reverse=reverse)
        loss = loss_of(out, finals, probes)
        return [out.detach(), *(f.detach() for f in finals), *grads(loss, args)]

    probe_shapes = [inputs[0].shape[:2] + (inputs[1].shape[1],)] + [s.shape for s in inputs[1 : 1 + num_states]]
    probes = [torch.randn(shape, generator=gen, dtype=torch.float64) for shape in probe_shapes]
    exact_inputs = [None if t is None else t.detach().double().requires_grad_() for t in inputs]
    ours, eager = evaluate(functional, inputs), evaluate(reference, inputs)
    exact = evaluate(reference, exact_inputs)
    names = ["output"] + [f"final state {i}" for i in range(num_states)]
    names += ["grad of input"] + [f"grad of state{i}" for i in range(num_states)]
    names += [n for n, t in zip(["grad of weight_ih", "grad of weight_hh", "grad of bias_ih", "grad of bias_hh"],
                                inputs[1 + num_states :]) if t is not None]
    assert len(names) == len(ours)
    for name, a, b, e in zip(names, ours, eager, exact):
        assert_accuracy_rule(a, b, e, name)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("cell", CELLS)
def test_layer_matches_reference(cell, reverse, dtype, device):
    _compare_layer(cell, dtype, device, steps=7, batch=3, input_size=5, hidden=8, bias=True, reverse=reverse)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("steps,batch,input_size,hidden", [(1, 1, 1, 1), (12, 2, 3, 33), (4, 17, 9, 64)])
def test_layer_shapes_and_no_bias(cell, steps, batch, input_size, hidden, device):
    _compare_layer(cell, torch.float64, device, steps, batch, input_size, hidden, bias=False, reverse=False, seed=1)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("cell", CELLS)
def test_large_hidden_float32_uses_parallel_pointwise(cell, device):
    # B*H above the CPU's parallel grain: the pointwise pass is split across threads.
    _compare_layer(cell, torch.float32, device, steps=3, batch=40, input_size=16, hidden=300, bias=True,
                   reverse=True, seed=2)


# float32 runs the packed-GEMM path. rnn_relu is left out of it: relu's derivative jumps at 0, and among
# 10^6 float32 pre-activations one lands within rounding of 0 and flips a gradient by O(1), in ours or in
# eager, by luck. The chunking is cell-independent; rnn_tanh covers it in float32.
CHUNK_CASES = [(cell, torch.float64) for cell in CELLS] + [(cell, torch.float32) for cell in CELLS if cell != "rnn_relu"]


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("cell,dtype", CHUNK_CASES, ids=[f"{c}-{str(d)[6:]}" for c, d in CHUNK_CASES])
def test_long_batch_runs_in_chunks(cell, dtype, reverse):
    # The CPU engine projects inputs and runs the backward's large GEMMs a few MiB of steps at a time:
    # at B=64, H=384 a chunk is 5 to 42 steps, so 45 steps cross chunk edges (the first and last steps,
    # which read h_0, included) in both directions.
    _compare_layer(cell, dtype, "cpu", steps=45, batch=64, input_size=16, hidden=384, bias=True, reverse=reverse,
                   seed=3, accuracy_rule=dtype == torch.float32)


# Gate rows a multiple of 4 KiB (LSTM(256): 4H = 1024 floats): the CPU backward lays its gate
# gradients' rows out further apart so that its products read them in place; 12 rows (more than a
# kernel block of 8), over a chunk edge of the backward (168 steps of 12 such rows).
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_gate_rows_of_4_kib(reverse):
    _compare_layer("lstm", torch.float32, "cpu", steps=180, batch=12, input_size=16, hidden=256, bias=True,
                   reverse=reverse, seed=5, accuracy_rule=True)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("cell", CELLS)
def test_gradcheck(cell, device):
    gen = torch.Generator().manual_seed(3)
    x, states, w_ih, w_hh, b_ih, b_hh = layer_args(cell, 4, 2, 3, 5, torch.float64, device, generator=gen)
    gradcheck_layer(cell, x, states, (w_ih, w_hh, b_ih, b_hh))


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("cell", CELLS)
def test_opcheck_forward(cell, device):
    gen = torch.Generator().manual_seed(4)
    for training, requires_grad in ((True, True), (False, False)):
        x, states, w_ih, w_hh, b_ih, b_hh = layer_args(cell, 5, 3, 4, 6, torch.float64, device,
                                                       requires_grad=requires_grad, generator=gen)
        torch.library.opcheck(_ops.forward_op(cell),
                              (x, *states, w_ih, w_hh, b_ih, b_hh, *proj(cell), None, False, training))
        torch.library.opcheck(_ops.forward_op(cell),
                              (x, *states, w_ih, w_hh, None, None, *proj(cell), None, True, training))


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("cell", CELLS)
def test_opcheck_backward(cell, device):
    gen = torch.Generator().manual_seed(5)
    x, states, w_ih, w_hh, b_ih, b_hh = layer_args(cell, 5, 3, 4, 6, torch.float64, device, requires_grad=False,
                                                   generator=gen)
    out, *finals, workspace = _ops.forward_op(cell)(x, *states, w_ih, w_hh, b_ih, b_hh, *proj(cell), None, False, True)
    grad_out = torch.randn_like(out)
    grad_finals = [torch.randn_like(f) for f in finals]
    torch.library.opcheck(
        _ops.backward_op(cell),
        (grad_out, *grad_finals, x, *states, w_ih, w_hh, *proj(cell), out, workspace, None, False),
    )


@pytest.mark.parametrize("cell", CELLS)
def test_inference_saves_nothing(cell):
    x, states, w_ih, w_hh, b_ih, b_hh = layer_args(cell, 6, 2, 3, 4, requires_grad=False)
    result = _ops.forward_op(cell)(x, *states, w_ih, w_hh, b_ih, b_hh, *proj(cell), None, False, False)
    assert result[-1].numel() == 0
    with torch.no_grad():
        x.requires_grad_(True)
        out, _ = functional.layer(cell, x, states, w_ih, w_hh, b_ih, b_hh)
    assert out.grad_fn is None


@pytest.mark.parametrize("cell", CELLS)
def test_training_workspace_shape(cell):
    x, states, w_ih, w_hh, b_ih, b_hh = layer_args(cell, 6, 2, 3, 4, requires_grad=False)
    planes = _ops.CELL_LAYOUTS[cell][2]
    result = _ops.forward_op(cell)(x, *states, w_ih, w_hh, b_ih, b_hh, *proj(cell), None, False, True)
    assert result[-1].shape == (6, planes, 2, 4)
    assert len(result) == 2 + NUM_STATES[cell]


@pytest.mark.parametrize("cell", CELLS)
def test_backward_without_workspace_is_a_clear_error(cell):
    x, states, w_ih, w_hh, b_ih, b_hh = layer_args(cell, 3, 2, 3, 4, requires_grad=False)
    out, *finals, workspace = _ops.forward_op(cell)(x, *states, w_ih, w_hh, b_ih, b_hh, *proj(cell), None, False, False)
    with pytest.raises(ValueError, match="workspace.*training=False"):
        _ops.backward_op(cell)(torch.ones_like(out), *[torch.zeros_like(f) for f in finals], x, *states, w_ih, w_hh,
                               *proj(cell), out, workspace, None, False)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("cell", CELLS)
def test_non_contiguous_inputs(cell, device):
    gen = torch.Generator().manual_seed(6)
    x, states, w_ih, w_hh, b_ih, b_hh = layer_args(cell, 5, 3, 4, 6, torch.float64, device, requires_grad=False,
                                                   generator=gen)
    x_t = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, batch-major memory
    w_ih_t = w_ih.t().contiguous().t()
    states_x = [s[:1].expand(3, -1) for s in states]
    out, finals = functional.layer(cell, x_t, states_x, w_ih_t, w_hh, b_ih, b_hh)
    ref_out, ref_finals = reference.layer(cell, x, [s[:1].expand(3, -1) for s in states], w_ih, w_hh, b_ih, b_hh)
    assert not x_t.is_contiguous()
    assert_close(out, ref_out, 1e-10, 1e-9, "output")
    for f, rf in zip(finals, ref_finals):
        assert_close(f, rf, 1e-10, 1e-9, "final state")


@pytest.mark.parametrize("cell", CELLS)
def test_empty_sequence_is_refused_and_empty_batch_works(cell):
    # As torch.nn: "Expected sequence length to be larger than 0" for T = 0; B = 0 gives empty results.
    x, states, w_ih, w_hh, b_ih, b_hh = layer_args(cell, 0, 2, 3, 4, requires_grad=True)
    with pytest.raises(ValueError, match=r"input must have at least one time step \(T >= 1\), got shape \[0, 2, 3\]"):
        functional.layer(cell, x, states, w_ih, w_hh, b_ih, b_hh)
    x, states, w_ih, w_hh, b_ih, b_hh = layer_args(cell, 3, 0, 3, 4, requires_grad=True)
    out, finals = functional.layer(cell, x, states, w_ih, w_hh, b_ih, b_hh)
    assert out.shape == (3, 0, 4)
    out.sum().backward()
    assert torch.equal(w_ih.grad, torch.zeros_like(w_ih))


@pytest.mark.parametrize("cell", CELLS)
def test_bitwise_deterministic(cell):
    gen = torch.Generator().manual_seed(7)
    x, states, w_ih, w_hh, b_ih, b_hh = layer_args(cell, 9, 40, 16, 300, torch.float32, generator=gen)
    inputs = [x, *states, w_ih, w_hh, b_ih, b_hh]
    results = []
    for _ in range(2):
        out, finals = functional.layer(cell, x, states, w_ih, w_hh, b_ih, b_hh, reverse=True)
        results.append([out, *finals, *grads(out.square().sum(), inputs)])
    for a, b in zip(*results):
        assert torch.equal(a, b)


# A float32 call of up to 4 steps at up to 4 rows reads its weights in place instead of packing them
# (csrc/engine/cpu/packed_gemm.h, gemm_rows; recurrent_engine.cpp, matrix_form); 5 rows or 5 steps
# go back to packing. Widths with tails (H = 13: 4-row groups and 8-lane runs both partial; 70: two
# unequal blocks with 2 threads), and a transposed weight, which cannot be read in place.
@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "transposed"])
@pytest.mark.parametrize("steps", [1, 4, 5])
@pytest.mark.parametrize("batch", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("hidden", [13, 70])
@pytest.mark.parametrize("cell", CELLS)
def test_short_calls_match_reference(cell, hidden, batch, steps, transposed):
    gen = torch.Generator().manual_seed(hidden + batch + steps)
    x, states, w_ih, w_hh, b_ih, b_hh = layer_args(cell, steps, batch, 11, hidden, torch.float32, generator=gen,
                                                   requires_grad=False)
    if transposed:
        w_ih, w_hh = w_ih.t().contiguous().t(), w_hh.t().contiguous().t()
    out, finals = functional.layer(cell, x, states, w_ih, w_hh, b_ih, b_hh)
    ref_out, ref_finals = reference.layer(cell, x.double(), [s.double() for s in states], w_ih.double(),
                                          w_hh.double(), b_ih.double(), b_hh.double())
    torch.testing.assert_close(out.double(), ref_out, atol=2e-6, rtol=1e-5)
    for f, rf in zip(finals, ref_finals):
        torch.testing.assert_close(f.double(), rf, atol=2e-6, rtol=1e-5)


# A short float32 call's backward reads its transposed matrices' columns where they are (the chunk's
# W_ih^T, x^T, h^T up to 64 rows T x B; W_hh^T up to 4 steps), one block of rows in place and more
# packed a group at a time; longer calls pack them. Both sides of each bound, rows past one block, and
# a hidden size whose last panel is partial.
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("steps,batch", [(1, 1), (1, 16), (1, 40), (1, 64), (4, 16), (5, 12), (3, 22), (5, 16)])
@pytest.mark.parametrize("cell", CELLS)
def test_short_backward_matches_reference(cell, steps, batch, reverse):
    _compare_layer(cell, torch.float32, "cpu", steps, batch, 37, 70, True, reverse, seed=steps * 100 + batch,
                   accuracy_rule=True)


# The CPU kernels read each thread's bias rows in place through its row order (gathered once per
# call when the rows are permuted, i.e. with more than one thread): a strided bias must give the
# same bits as a contiguous one, in a one-step call (weights read in place) and a longer one (packed).
@pytest.mark.parametrize("steps", [1, 6])
@pytest.mark.parametrize("cell", CELLS)
def test_strided_biases_give_the_same_bits(cell, steps):
    gen = torch.Generator().manual_seed(steps)
    x, states, w_ih, w_hh, b_ih, b_hh = layer_args(cell, steps, 2, 32, 256, torch.float32, generator=gen,
                                                   requires_grad=False)

    out, finals = functional.layer(cell, x, states, w_ih, w_hh, strided(b_ih), strided(b_hh))
    want_out, want_finals = functional.layer(cell, x, states, w_ih, w_hh, b_ih, b_hh)
    assert not strided(b_ih).is_contiguous()
    assert torch.equal(out, want_out)
    for f, want in zip(finals, want_finals):
        assert torch.equal(f, want)
    ref_out, _ = reference.layer(cell, x.double(), [s.double() for s in states], w_ih.double(), w_hh.double(),
                                 b_ih.double(), b_hh.double())
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
