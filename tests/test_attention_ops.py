"""torch.ops.rnnattn.*_attn_* (the attention-augmented cell) against the reference: outputs, final
states, context, attention weights and every gradient; gradcheck; opcheck; edge cases."""

import pytest
import torch

from rnnattn_ext import _ops, functional, reference

from conftest import device_params
from helpers import (CELLS, GATES, NUM_STATES, assert_accuracy_rule, assert_close, attention_args, grads, op_weights,
                     proj, strided)

TOLERANCES = {torch.float64: (1e-10, 1e-9)}


def _compare(cell, dtype, device, steps, batch, hidden, heads, head_dim, window=None, memory_slots=None,
             padded=False, reverse=False, bias=True, seed=0, sequence_lengths=None):
    gen = torch.Generator().manual_seed(seed)
    if sequence_lengths is not None:
        sequence_lengths = torch.tensor(sequence_lengths, device=device)
    x, states, weights, memory = attention_args(cell, steps, batch, 5, hidden, heads, head_dim, memory_slots,
                                                dtype=dtype, device=device, bias=bias, generator=gen)
    lengths = None
    if padded:
        lengths = torch.randint(1, memory_slots + 1, (batch,), generator=gen)
        lengths[0] = 1
        lengths = lengths.to(device)
    inputs = [x, *states, *weights, memory]
    names = ["input", *[f"state{i}" for i in range(len(states))], "weight_ih", "weight_hh", "bias_ih", "bias_hh",
             "weight_q", "bias_q", "weight_k", "bias_k", "weight_v", "bias_v", "weight_c", "memory"]
    kept = [(n, t) for n, t in zip(names, inputs) if t is not None]
    probes = None

    def evaluate(impl, args):
        """Outputs (output, finals, context, weights) and the gradients of a probe loss over all of them."""
        nonlocal probes
        x_, *rest = args
        states_ = rest[: len(states)]
        weights_ = rest[len(states) : len(states) + 11]
        memory_ = rest[-1]
        if impl == "ours":
            out, finals, ctx, att = functional.attention_layer(cell, x_, states_, weights_, heads, window, memory_,
                                                               lengths, reverse=reverse, need_weights=True,
                                                               lengths=sequence_lengths)
        else:
            out, finals, ctx, att = reference.attention_layer(cell, x_, states_, *weights_, num_heads=heads,
                                                              window=window, memory=memory_, memory_lengths=lengths,
                                                              reverse=reverse, lengths=sequence_lengths)
        if probes is None:
            probes = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in (out, *finals, ctx)]
        loss = sum((t * p.to(t)).sum() for t, p in zip((out, *finals, ctx), probes))
        values = [out, *finals, ctx, att]
        return [v.detach() for v in values] + list(grads(loss, [t for t in args if t is not None]))

    what = ["output", *[f"final state {i}" for i in range(len(states))], "context", "attention weights"]
    what += [f"grad of {n}" for n, _ in kept]
    ours = evaluate("ours", inputs)
    ref = evaluate("reference", inputs)
    if dtype == torch.float64:
        atol, rtol = TOLERANCES[dtype]
        for name, a, b in zip(what, ours, ref):
            assert_close(a, b, atol * 10, rtol * 10, name)
        return
    # Lower precision: the SPEC accuracy rule against the float64 reference on the same inputs.
    truth = evaluate("reference", [None if t is None else t.detach().double().requires_grad_() for t in inputs])
    for name, a, b, exact in zip(what, ours, ref, truth):
        assert_accuracy_rule(a, b, exact, name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("cell,memory_slots", [("lstm", None), ("gru", 7)], ids=["lstm-self", "gru-external"])
def test_long_batch_runs_in_chunks(cell, memory_slots, dtype):
    # At B=64, H=256 the CPU engine's chunks of steps (a few MiB each) are 5 to 14 steps long.
    _compare(cell, dtype, "cpu", steps=20, batch=64, hidden=256, heads=4, head_dim=16,
             window=3 if memory_slots is None else None, memory_slots=memory_slots, padded=memory_slots is not None,
             reverse=True, seed=4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("heads", [1, 4])
@pytest.mark.parametrize("window", [1, 3, None], ids=["w1", "w3", "unbounded"])
@pytest.mark.parametrize("cell", CELLS)
def test_self_memory_matches_reference(cell, window, heads, dtype):
    # H = 64: two blocks of units (and of heads) on a 2-thread CPU.
    _compare(cell, dtype, "cpu", steps=40, batch=3, hidden=64, heads=heads, head_dim=4, window=window)


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("memory_slots,window", [(None, None), (None, 5), (9, None)],
                         ids=["self", "self-w5", "external"])
@pytest.mark.parametrize("head_dim", [8, 40])
@pytest.mark.parametrize("cell", CELLS)
def test_vector_attention_matches_reference(cell, head_dim, memory_slots, window, reverse):
    # float32 with head_dim a multiple of 8 takes the CPU's vector attention passes (cpu/attention_cpu.h):
    # 13 steps read 1 to 13 slots (their 4-slot, 8-lane and odd-slot tails), 40 columns are a chunk of
    # 32 and one of 8; two heads over two threads; rows of 1 to 13 steps, one padded memory row.
    _compare(cell, torch.float32, "cpu", steps=13, batch=4, hidden=64, heads=2, head_dim=head_dim, window=window,
             memory_slots=memory_slots, padded=memory_slots is not None, reverse=reverse,
             sequence_lengths=[13, 9, 1, 12])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("heads", [1, 4])
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("cell", CELLS)
def test_external_memory_matches_reference(cell, padded, heads, dtype):
    _compare(cell, dtype, "cpu", steps=23, batch=4, hidden=40, heads=heads, head_dim=3, memory_slots=9,
             padded=padded)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("memory", [None, 6], ids=["self", "external"])
@pytest.mark.parametrize("cell", CELLS)
def test_reverse_and_no_bias_match_reference(cell, memory, device):
    # Without biases: on CUDA the query, key and value rows are then staged without one.
    _compare(cell, torch.float64, device, steps=9, batch=2, hidden=12, heads=2, head_dim=3, window=3 if memory is None
             else None, memory_slots=memory, padded=memory is not None, reverse=True, bias=False)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("memory", [None, 4], ids=["self", "external"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("cell", CELLS)
def test_gradcheck(cell, reverse, memory, device):
    gen = torch.Generator().manual_seed(1)
    x, states, weights, mem = attention_args(cell, 5, 2, 3, 4, 2, 2, memory, memory_width=3, device=device,
                                             generator=gen)
    lengths = torch.tensor([4, 2], device=device) if memory else None
    ns = NUM_STATES[cell]
    inputs = [x, *states, *weights] + ([mem] if mem is not None else [])

    def fn(*args):
        out, finals, ctx, _ = functional.attention_layer(
            cell, args[0], args[1 : 1 + ns], args[1 + ns : 12 + ns], 2, None if memory else 2,
            args[12 + ns] if memory else None, lengths, reverse=reverse)
        return out, *finals, ctx

    assert torch.autograd.gradcheck(fn, inputs, atol=1e-6)


def _op_args(cell, device, memory, requires_grad, seed):
    gen = torch.Generator().manual_seed(seed)
    x, states, weights, mem = attention_args(cell, 5, 3, 4, 6, 2, 3, memory, device=device,
                                             requires_grad=requires_grad, generator=gen)
    lengths = torch.tensor([memory, 1, 2], device=device) if memory else None
    return x, states, weights, mem, lengths


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("memory", [None, 4], ids=["self", "external"])
@pytest.mark.parametrize("cell", CELLS)
def test_opcheck_forward(cell, memory, device):
    for training, need_weights in ((True, True), (False, False), (False, True)):
        x, states, weights, mem, lengths = _op_args(cell, device, memory, training, 2)
        window = None if memory else 2
        torch.library.opcheck(_ops.attention_forward_op(cell),
                              (x, *states, *op_weights(cell, weights), mem, lengths, None, None, None, 2, window, False,
                               training, need_weights))


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("memory", [None, 4], ids=["self", "external"])
@pytest.mark.parametrize("cell", CELLS)
def test_opcheck_backward(cell, memory, device):
    x, states, weights, mem, lengths = _op_args(cell, device, memory, False, 3)
    window = None if memory else 2
    result = _ops.attention_forward_op(cell)(x, *states, *op_weights(cell, weights), mem, lengths, None, None, None, 2,
                                             window, True, True, False)
    ns = NUM_STATES[cell]
    out, finals, ctx = result[0], result[1 : 1 + ns], result[1 + ns]
    workspace, attention_workspace = result[-2], result[-1]
    w_ih, w_hh, _, _, w_q, _, w_k, _, w_v, _, w_c = weights
    for grad_context in (torch.randn_like(ctx), None):
        torch.library.opcheck(
            _ops.attention_backward_op(cell),
            (torch.randn_like(out), *[torch.randn_like(f) for f in finals], grad_context, x, *states, w_ih, w_hh,
             *proj(cell), w_q, w_k, w_v, w_c, mem, lengths, None, None, None, out, ctx, workspace, attention_workspace, 2,
             window, True),
        )


@pytest.mark.parametrize("cell", CELLS)
def test_inference_saves_nothing_and_matches_training(cell):
    x, states, weights, mem, lengths = _op_args(cell, "cpu", None, False, 4)
    args = (x, *states, *op_weights(cell, weights), mem, lengths, None, None, None, 2, 3, False)
    infer = _ops.attention_forward_op(cell)(*args, False, False)
    train = _ops.attention_forward_op(cell)(*args, True, False)
    assert infer[-1].numel() == 0 and infer[-2].numel() == 0 and infer[-3].numel() == 0
    for a, b in zip(infer[:-2], train[:-2]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("memory", [None, 5], ids=["self", "external"])
@pytest.mark.parametrize("cell", CELLS)
def test_bitwise_deterministic(cell, memory):
    gen = torch.Generator().manual_seed(6)
    x, states, weights, mem = attention_args(cell, 30, 4, 8, 64, 4, 8, memory, dtype=torch.float32, generator=gen)

    def run():
        out, finals, ctx, _ = functional.attention_layer(cell, x, states, weights, 4, None if memory else 7, mem)
        return [out, *finals, ctx, *torch.autograd.grad((out.sum() + ctx.sum()), [x, *weights[:2], *weights[4:]])]

    first, second = run(), run()
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# The CPU kernels read the recurrent side (W_hh, W_q, W_k, W_v and their biases) where each tensor
# lies, through a table of row addresses: strided parts and a mix of present and absent biases must
# give the bits of contiguous parts with zero biases, in a one-step call (weights read in place) and
# a longer one (packed), over two threads' blocks (hidden 256) and one.
@pytest.mark.parametrize("hidden", [32, 256])
@pytest.mark.parametrize("steps", [1, 6])
@pytest.mark.parametrize("cell", CELLS)
def test_strided_parts_and_missing_biases_give_the_same_bits(cell, steps, hidden):
    gen = torch.Generator().manual_seed(steps)
    x, states, weights, _ = attention_args(cell, steps, 2, 16, hidden, 4, 8, dtype=torch.float32,
                                           requires_grad=False, generator=gen)
    w_ih, w_hh, b_ih, b_hh, w_q, b_q, w_k, b_k, w_v, b_v, w_c = weights
    b_q = torch.zeros_like(b_q)  # given as None below
    b_v = torch.zeros_like(b_v)
    given = (w_ih, strided(w_hh), b_ih, strided(b_hh), strided(w_q), None, w_k, strided(b_k), strided(w_v), None, w_c)
    want = (w_ih, w_hh, b_ih, b_hh, w_q, b_q, w_k, b_k, w_v, b_v, w_c)
    assert not given[1].is_contiguous() and not given[4].is_contiguous()
    out, finals, ctx, _ = functional.attention_layer(cell, x, states, given, 4, 3)
    want_out, want_finals, want_ctx, _ = functional.attention_layer(cell, x, states, want, 4, 3)
    for a, b in zip([out, *finals, ctx], [want_out, *want_finals, want_ctx]):
        assert torch.equal(a, b)
    ref = reference.attention_layer(cell, x.double(), [s.double() for s in states], *[w.double() for w in want],
                                    num_heads=4, window=3)
    assert_close(out.double(), ref[0], 1e-5, 1e-5, "output")


# Batch 40 splits the CPU loop by rows (conftest's bound: every layer small enough): each thread
# stages, attends and projects the context for its own rows, every head, with no barrier. Hidden 24
# has no block of 32 units to split into; 3 threads give ranges of 13, 13 and 14 rows. Self memory
# with a window and sequence lengths, external memory with padded rows, forward in reverse too.
@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("memory_slots", [None, 6], ids=["self", "external"])
@pytest.mark.parametrize("cell", CELLS)
def test_split_by_batch_rows_matches_reference(cell, memory_slots, dtype, threads):
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        attention_rows = (3 if memory_slots is None else 1) * 2 * 8
        gates = GATES[cell]
        for backward in (False, True):
            assert _ops._C.cpu_loop_split(gates, 24, 40, 9, backward, True, attention_rows) == (1, threads)
        lengths = torch.randint(1, 10, (40,), generator=torch.Generator().manual_seed(3)).tolist()
        _compare(cell, dtype, "cpu", 9, 40, 24, 2, 8, window=None if memory_slots else 4, memory_slots=memory_slots,
                 padded=memory_slots is not None, seed=5, sequence_lengths=lengths)
        _compare(cell, dtype, "cpu", 9, 40, 24, 2, 8, window=None if memory_slots else 4, memory_slots=memory_slots,
                 reverse=True, seed=6)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("threads", [1, 2])
def test_thread_count_does_not_change_results(threads):
    # The CPU splits units and heads over threads; the split must not change the numbers beyond rounding.
    gen = torch.Generator().manual_seed(7)
    x, states, weights, _ = attention_args("lstm", 12, 3, 8, 96, 4, 6, dtype=torch.float64, generator=gen)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        out, finals, ctx, _ = functional.attention_layer("lstm", x, states, weights, 4, 5)
    finally:
        torch.set_num_threads(previous)
    ref = reference.attention_layer("lstm", x, states, *weights, num_heads=4, window=5)
    assert_close(out, ref[0], 1e-10, 1e-9, "output")
    assert_close(ctx, ref[2], 1e-10, 1e-9, "context")


@pytest.mark.parametrize("memory", [None, 3], ids=["self", "external"])
@pytest.mark.parametrize("cell", CELLS)
def test_empty_batch_works_and_empty_time_is_refused(cell, memory):
    # As torch.nn: an empty batch gives empty results, a sequence of no steps is an error.
    x, states, weights, mem = attention_args(cell, 4, 0, 4, 6, 2, 2, memory)
    out, finals, ctx, att = functional.attention_layer(cell, x, states, weights, 2, None, mem, need_weights=True)
    assert out.shape == (4, 0, 6) and ctx.shape == (4, 0, 4)
    for f, s in zip(finals, states):
        assert torch.equal(f, s)
    loss = out.sum() + ctx.sum() + sum(f.sum() for f in finals)
    loss.backward()
    assert x.grad.shape == x.shape
    x, states, weights, mem = attention_args(cell, 0, 3, 4, 6, 2, 2, memory)
    with pytest.raises(ValueError, match=r"input must have at least one time step \(T >= 1\)"):
        functional.attention_layer(cell, x, states, weights, 2, None, mem)


def test_context_gradient_alone_reaches_every_weight():
    x, states, weights, _ = attention_args("gru", 6, 2, 3, 8, 2, 2)
    _, _, ctx, _ = functional.attention_layer("gru", x, states, weights, 2, 2)
    ctx.sum().backward()
    assert weights[4].grad.abs().sum() > 0 and weights[6].grad.abs().sum() > 0 and x.grad.abs().sum() > 0


def test_attention_weights_carry_no_gradient():
    x, states, weights, _ = attention_args("lstm", 4, 2, 3, 8, 2, 2)
    _, _, _, att = functional.attention_layer("lstm", x, states, weights, 2, None, need_weights=True)
    assert not att.requires_grad
