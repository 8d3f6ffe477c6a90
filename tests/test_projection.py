"""The LSTM projection (torch.nn's proj_size, ``weight_hr``) in the ops: the base and the attention
cell against the reference (values, final states, every gradient), with variable lengths, in both
directions, on one and several CPU blocks, across the CPU engine's chunk edges; gradcheck, opcheck
and the errors that name the argument."""

import pytest
import torch

from rnnattn_ext import _ops, functional, reference

from conftest import device_params
from helpers import assert_accuracy_rule, assert_close, grads

TOLERANCES = {torch.float64: (1e-10, 1e-9), torch.float32: (2e-5, 1e-4)}


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _rand(gen, *shape, scale=1.0, dtype=torch.float64, device="cpu", requires_grad=True):
    t = (torch.rand(*shape, dtype=torch.float64, generator=gen) * 2 - 1) * scale
    return t.to(device=device, dtype=dtype).requires_grad_(requires_grad)


def projected_args(gen, steps, batch, input_size, hidden, proj, dtype=torch.float64, device="cpu",
                   requires_grad=True):
    """input, [h0 (B, P), c0 (B, H)] and (w_ih, w_hh (4H, P), b_ih, b_hh, w_hr (P, H)), torch.nn's init scale."""
    def rand(*shape, scale=1.0):
        return _rand(gen, *shape, scale=scale, dtype=dtype, device=device, requires_grad=requires_grad)

    k = hidden**-0.5
    x = rand(steps, batch, input_size)
    states = [rand(batch, proj), rand(batch, hidden)]
    weights = (rand(4 * hidden, input_size, scale=k), rand(4 * hidden, proj, scale=k), rand(4 * hidden, scale=k),
               rand(4 * hidden, scale=k), rand(proj, hidden, scale=k))
    return x, states, weights


def attention_weights(gen, hidden, proj, heads, head_dim, memory_width=None, dtype=torch.float64, device="cpu",
                      requires_grad=True):
    """(w_q, b_q, w_k, b_k, w_v, b_v, w_c): the query (and a self memory) read h, P wide."""
    def rand(*shape, scale):
        return _rand(gen, *shape, scale=scale, dtype=dtype, device=device, requires_grad=requires_grad)

    width, memory_width = heads * head_dim, memory_width or proj
    return (rand(width, proj, scale=2 / proj**0.5), rand(width, scale=0.5),
            rand(width, memory_width, scale=2 / memory_width**0.5), rand(width, scale=0.5),
            rand(width, memory_width, scale=1 / memory_width**0.5), rand(width, scale=0.5),
            rand(4 * hidden, width, scale=1 / width**0.5))


def _run_layer(impl, x, states, weights, reverse, lengths):
    w_ih, w_hh, b_ih, b_hh, w_hr = weights
    return impl.layer("lstm", x, states, w_ih, w_hh, b_ih, b_hh, reverse=reverse, lengths=lengths, weight_hr=w_hr)


def _compare(x, states, weights, reverse, lengths, gen, what=""):
    """Ours against the reference: elementwise in float64; float32 by the SPEC's accuracy rule against the
    float64 reference."""
    inputs = [x, *states, *weights]

    def evaluate(impl, args):
        out, finals = _run_layer(impl, args[0], args[1:3], args[3:], reverse, lengths)
        loss = sum((t * p.to(t)).sum() for t, p in zip((out, *finals), probes))
        return [out.detach(), *(f.detach() for f in finals), *grads(loss, args)]

    shapes = [(x.shape[0], x.shape[1], weights[4].shape[0]), states[0].shape, states[1].shape]
    probes = [torch.randn(shape, generator=gen, dtype=torch.float64) for shape in shapes]
    ours, eager = evaluate(functional, inputs), evaluate(reference, inputs)
    names = ["output", "h_n", "c_n", "grad input", "grad h0", "grad c0", "grad weight_ih", "grad weight_hh",
             "grad bias_ih", "grad bias_hh", "grad weight_hr"]
    if x.dtype == torch.float64:
        atol, rtol = TOLERANCES[x.dtype]
        for name, a, b in zip(names, ours, eager):
            assert_close(a, b, atol, rtol, f"{what} {name}")
        return
    exact = evaluate(reference, [t.detach().cpu().double().requires_grad_() for t in inputs])
    for name, a, b, e in zip(names, ours, eager, exact):
        assert_accuracy_rule(a.cpu(), b.cpu(), e, f"{what} {name}")


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
def test_layer_matches_reference(with_lengths, reverse, dtype, device):
    gen = torch.Generator().manual_seed(30)
    x, states, weights = projected_args(gen, 7, 4, 5, 8, 3, dtype, device)
    lengths = torch.tensor([5, 7, 1, 3], device=device) if with_lengths else None
    _compare(x, states, weights, reverse, lengths, gen)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_several_blocks_match_reference(threads, dtype, restore_threads):
    # H = 100 splits into blocks of units (one per thread); P = 37 into uneven column shares.
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(31)
    x, states, weights = projected_args(gen, 6, 13, 7, 100, 37, dtype)
    for reverse in (False, True):
        _compare(x, states, weights, reverse, torch.tensor([6, 2, 5, 6, 1, 4, 3, 6, 2, 2, 5, 1, 6]), gen,
                 f"reverse={reverse}")


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_long_batch_runs_in_chunks(dtype, reverse):
    # B=64, H=384: the CPU engine's chunks of steps are a few steps long, so 30 steps cross their edges.
    gen = torch.Generator().manual_seed(32)
    x, states, weights = projected_args(gen, 30, 64, 16, 384, 96, dtype)
    _compare(x, states, weights, reverse, None, gen)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_half_precision_on_cuda(dtype):
    # 16-bit storage, float accumulation: the SPEC's accuracy rule against the float64 reference.
    gen = torch.Generator().manual_seed(40)
    x, states, weights = projected_args(gen, 12, 4, 16, 32, 12, dtype, "cuda")
    for reverse in (False, True):
        _compare(x, states, weights, reverse, torch.tensor([12, 3, 7, 1], device="cuda"), gen, f"reverse={reverse}")


@pytest.mark.parametrize("device", device_params())
def test_gradcheck(device):
    gen = torch.Generator().manual_seed(33)
    x, states, weights = projected_args(gen, 4, 3, 3, 5, 2, device=device)
    for reverse in (False, True):
        for lengths in (None, torch.tensor([4, 1, 3], device=device)):

            def fn(x, h0, c0, *weights, reverse=reverse, lengths=lengths):
                out, finals = _run_layer(functional, x, [h0, c0], weights, reverse, lengths)
                return (out, *finals)

            assert torch.autograd.gradcheck(fn, (x, *states, *weights))


@pytest.mark.parametrize("device", device_params())
def test_opcheck(device):
    gen = torch.Generator().manual_seed(34)
    for training in (True, False):
        x, states, weights = projected_args(gen, 5, 3, 4, 6, 4, device=device, requires_grad=training)
        w_ih, w_hh, b_ih, b_hh, w_hr = weights
        lengths = torch.tensor([5, 2, 4], device=device)
        torch.library.opcheck(_ops.forward_op("lstm"),
                              (x, *states, w_ih, w_hh, b_ih, b_hh, w_hr, None, False, training))
        torch.library.opcheck(_ops.forward_op("lstm"), (x, *states, w_ih, w_hh, None, None, w_hr, lengths, True,
                                                        training))
    plain = [t.detach() for t in (x, *states, w_ih, w_hh, w_hr)]
    out, *finals, workspace = _ops.forward_op("lstm")(*plain[:5], b_ih, b_hh, plain[5], lengths, True, True)
    torch.library.opcheck(_ops.backward_op("lstm"), (torch.randn_like(out), *[torch.randn_like(f) for f in finals],
                                                     *plain, out, workspace, lengths, True))


def test_workspace_keeps_the_unprojected_output():
    gen = torch.Generator().manual_seed(35)
    x, states, (w_ih, w_hh, b_ih, b_hh, w_hr) = projected_args(gen, 6, 2, 3, 5, 2, requires_grad=False)
    out, h_n, c_n, workspace = _ops.forward_op("lstm")(x, *states, w_ih, w_hh, b_ih, b_hh, w_hr, None, False, True)
    assert out.shape == (6, 2, 2) and h_n.shape == (2, 2) and c_n.shape == (2, 5)
    assert workspace.shape == (6, _ops.CELL_LAYOUTS["lstm"][2] + 1, 2, 5)
    # The last plane is m_t = o * tanh(c_t), which W_hr projects to the output.
    torch.testing.assert_close(workspace[:, -1] @ w_hr.t(), out, atol=1e-12, rtol=1e-12)
    inference = _ops.forward_op("lstm")(x, *states, w_ih, w_hh, b_ih, b_hh, w_hr, None, False, False)
    assert inference[-1].numel() == 0
    for a, b in zip(inference[:3], (out, h_n, c_n)):
        assert torch.equal(a, b)


def test_bitwise_deterministic():
    gen = torch.Generator().manual_seed(36)
    x, states, weights = projected_args(gen, 9, 5, 4, 70, 30, torch.float32)

    def run():
        out, finals = _run_layer(functional, x, states, weights, True, torch.tensor([9, 3, 9, 1, 6]))
        return [out, *finals, *grads(out.sum() + finals[0].sum(), [x, *states, *weights])]

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


def _attention_case(gen, memory_slots, dtype=torch.float64, device="cpu", batch=3, steps=7):
    hidden, proj, heads, head_dim = 8, 5, 2, 3
    x, states, base = projected_args(gen, steps, batch, 4, hidden, proj, dtype, device)
    attention = attention_weights(gen, hidden, proj, heads, head_dim, 6 if memory_slots else None, dtype, device)
    memory = None if memory_slots is None else _rand(gen, memory_slots, batch, 6, dtype=dtype, device=device)
    return x, states, (*base[:4], *attention, base[4]), memory, heads


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("memory_slots,window", [(None, 1), (None, 3), (None, None), (4, None)],
                         ids=["self-w1", "self-w3", "self-unbounded", "external"])
@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
def test_attention_cell_matches_reference(with_lengths, memory_slots, window, reverse, device):
    gen = torch.Generator().manual_seed(37)
    x, states, weights, memory, heads = _attention_case(gen, memory_slots, device=device)
    memory_lengths = None if memory is None else torch.tensor([4, 1, 2], device=device)
    lengths = torch.tensor([7, 2, 5], device=device) if with_lengths else None
    out, finals, context, attention = functional.attention_layer(
        "lstm", x, states, weights, heads, window, memory, memory_lengths, reverse=reverse,
        need_weights=memory is None, lengths=lengths)
    ref_out, ref_finals, ref_context, ref_attention = reference.attention_layer(
        "lstm", x, states, *weights[:11], heads, window, memory, memory_lengths, reverse=reverse, lengths=lengths,
        weight_hr=weights[11])
    atol, rtol = TOLERANCES[torch.float64]
    for name, a, b in zip(["output", "h_n", "c_n", "context"], [out, *finals, context],
                          [ref_out, *ref_finals, ref_context]):
        assert_close(a, b, atol, rtol, name)
    if memory is None:
        assert_close(attention, ref_attention, atol, rtol, "attention weights")
    inputs = [t for t in (x, *states, *weights, memory) if t is not None]
    probes = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t) for t in (out, *finals, context)]
    ours = grads(sum((t * p).sum() for t, p in zip((out, *finals, context), probes)), inputs)
    theirs = grads(sum((t * p).sum() for t, p in zip((ref_out, *ref_finals, ref_context), probes)), inputs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert_close(a, b, atol * 10, rtol * 10, f"gradient {i}")


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("memory_slots", [None, 3], ids=["self", "external"])
def test_attention_cell_gradcheck_and_opcheck(memory_slots, device):
    gen = torch.Generator().manual_seed(38)
    x, states, weights, memory, heads = _attention_case(gen, memory_slots, device=device, batch=2, steps=3)
    window = None if memory_slots else 2
    lengths = torch.tensor([3, 2], device=device)

    def fn(x, h0, c0, *rest):
        weights, memory = rest[:12], (rest[12] if len(rest) > 12 else None)
        out, finals, context, _ = functional.attention_layer("lstm", x, [h0, c0], weights, heads, window, memory,
                                                             lengths=lengths)
        return (out, *finals, context)

    assert torch.autograd.gradcheck(fn, tuple(t for t in (x, *states, *weights, memory) if t is not None))
    op_weights = (*weights[:4], weights[11], *weights[4:11])
    torch.library.opcheck(_ops.attention_forward_op("lstm"),
                          (x, *states, *op_weights, memory, None, lengths, None, None, heads, window, False, True,
                           memory is None))


def test_errors_name_the_argument():
    gen = torch.Generator().manual_seed(39)
    x, states, (w_ih, w_hh, b_ih, b_hh, w_hr) = projected_args(gen, 4, 2, 3, 5, 2, requires_grad=False)

    def call(states=states, w_hh=w_hh, w_hr=w_hr):
        return _ops.forward_op("lstm")(x, *states, w_ih, w_hh, b_ih, b_hh, w_hr, None, False, False)

    with pytest.raises(ValueError, match=r"weight_hr must be 2-D \(P, H\), got shape \[10\]"):
        call(w_hr=torch.zeros(10, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"weight_hh must have shape \(G\*H, P\) .* = \[20, 2\], got \[20, 5\]"):
        call(w_hh=torch.zeros(20, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"h0 must have shape \(B, P\) = \[2, 2\], got \[2, 5\]"):
        call(states=[torch.zeros(2, 5, dtype=torch.float64), states[1]])
    with pytest.raises(ValueError, match=r"c0 must have shape \(B, H\) = \[2, 5\], got \[2, 2\]"):
        call(states=[states[0], torch.zeros(2, 2, dtype=torch.float64)])
    with pytest.raises(TypeError, match="weight_hr must have the dtype of input"):
        call(w_hr=w_hr.float())
    with pytest.raises(ValueError, match="weight_hr .* is defined for .*'lstm'.* only, got cell 'gru'"):
        functional.layer("gru", x, [states[0]], w_ih[:6], w_hh[:6], weight_hr=w_hr)
    _, _, weights, _, heads = _attention_case(gen, None)
    bad_q = weights[4][:, :4].detach()
    with pytest.raises(ValueError, match=r"weight_q must have shape \(D, P\) = \[6, 5\], got \[6, 4\]"):
        functional.attention_layer("lstm", torch.zeros(3, 3, 4, dtype=torch.float64),
                                   [torch.zeros(3, 5, dtype=torch.float64), torch.zeros(3, 8, dtype=torch.float64)],
                                   (*weights[:4], bad_q, *weights[5:]), heads)
