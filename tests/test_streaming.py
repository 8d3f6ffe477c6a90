"""Streaming: a sequence fed chunk by chunk (down to one step at a time) carrying the state gives the
outputs, final states and gradients of one call over the whole sequence, for every module and for
the attention cell's self memory (past slots carried as keys and values)."""

import pytest
import torch

import rnnattn_ext
from rnnattn_ext import _ops, functional

from conftest import device_params
from helpers import CELLS, attention_args, op_weights

CHUNKS = [3, 1, 4]  # 8 steps


def _chunked_attention(cell, x, states, weights, window):
    """attention_layer over x chunk by chunk, carrying states and past slots."""
    outputs, past_k, past_v = [], None, None
    start = 0
    for size in CHUNKS:
        chunk = x[start : start + size]
        y, finals, _, _ = functional.attention_layer(cell, chunk, states, weights, 2, window,
                                                     past_keys=past_k, past_values=past_v)
        past_k, past_v = functional.carried_slots(states[0], y, weights, window, past_k, past_v)
        outputs.append(y)
        states = finals
        start += size
    return torch.cat(outputs), states


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("window", [1, 2, 3, None], ids=["w1", "w2", "w3", "unbounded"])
@pytest.mark.parametrize("cell", CELLS)
def test_attention_chunks_equal_one_call(cell, window, device):
    gen = torch.Generator().manual_seed(21)
    x, states, weights, _ = attention_args(cell, sum(CHUNKS), 3, 4, 6, 2, 3, device=device, generator=gen)
    whole, whole_finals, _, _ = functional.attention_layer(cell, x, states, weights, 2, window)
    chunked, chunked_finals = _chunked_attention(cell, x, states, weights, window)
    torch.testing.assert_close(chunked, whole, atol=1e-12, rtol=1e-10)
    for a, b in zip(chunked_finals, whole_finals):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    # Gradients flow across chunks through the carried states and the past slots' keys and values.
    inputs = [t for t in (x, *states, *weights) if t is not None]
    probe = torch.randn(whole.shape, generator=gen, dtype=torch.float64).to(whole)
    expected = torch.autograd.grad((whole * probe).sum() + whole_finals[-1].sum(), inputs)
    got = torch.autograd.grad((chunked * probe).sum() + chunked_finals[-1].sum(), inputs)
    for i, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9, msg=lambda m, i=i: f"gradient {i}: {m}")


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_past_slots_gradcheck_and_opcheck(cell, device):
    gen = torch.Generator().manual_seed(22)
    x, states, weights, _ = attention_args(cell, 3, 2, 2, 4, 2, 2, device=device, generator=gen)
    past_k = torch.randn(2, 2, 4, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    past_v = torch.randn(2, 2, 4, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    n = len(states)
    for window in (3, None):

        def fn(x, *rest, window=window):
            out, finals, context, _ = functional.attention_layer(cell, x, list(rest[:n]), rest[n : n + 11], 2, window,
                                                                 past_keys=rest[-2], past_values=rest[-1])
            return (out, *finals, context)

        assert torch.autograd.gradcheck(fn, (x, *states, *weights, past_k, past_v))
        torch.library.opcheck(_ops.attention_forward_op(cell),
                              (x, *states, *op_weights(cell, weights), None, None, None, past_k, past_v, 2, window,
                               False, True, True))


def test_past_slots_errors_name_the_argument():
    x, states, weights, _ = attention_args("gru", 3, 2, 2, 4, 2, 2)
    keys = torch.randn(2, 2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="past_keys and past_values come together, got only past_keys"):
        functional.attention_layer("gru", x, states, weights, 2, 3, past_keys=keys)
    with pytest.raises(ValueError, match="continue a sequence forward, got reverse=True"):
        functional.attention_layer("gru", x, states, weights, 2, 3, reverse=True, past_keys=keys, past_values=keys)
    with pytest.raises(ValueError, match=r"past_keys must have shape \(P, B, D\) = \[2, 2, 4\], got \[2, 2, 3\]"):
        functional.attention_layer("gru", x, states, weights, 2, 3, past_keys=keys[..., :3], past_values=keys)
    _, _, ext_weights, memory = attention_args("gru", 3, 2, 2, 4, 2, 2, memory_slots=3)
    with pytest.raises(ValueError, match="slots of the self memory, got an external memory"):
        functional.attention_layer("gru", x, states, ext_weights, 2, None, memory, past_keys=keys, past_values=keys)


MODULES = [
    (rnnattn_ext.LSTM, {}), (rnnattn_ext.GRU, {}), (rnnattn_ext.RNN, {"nonlinearity": "relu"}),
    (rnnattn_ext.AttnLSTM, {"num_heads": 2, "window": 3}), (rnnattn_ext.AttnGRU, {"num_heads": 2}),
    (rnnattn_ext.AttnRNN, {"num_heads": 2, "window": 1}), (rnnattn_ext.AttnLSTM, {"num_heads": 2, "memory_size": 5}),
    (rnnattn_ext.LSTM, {"proj_size": 4}), (rnnattn_ext.AttnLSTM, {"num_heads": 2, "window": 3, "proj_size": 4}),
]


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("cls,extra", MODULES, ids=[f"{c.__name__}-{i}" for i, (c, _) in enumerate(MODULES)])
def test_module_stream_one_step_at_a_time(cls, extra, batch_first):
    torch.manual_seed(23)
    m = cls(3, 6, num_layers=2, batch_first=batch_first, **extra).double()
    x = torch.randn((2, 7, 3) if batch_first else (7, 2, 3), dtype=torch.float64)
    kwargs = {}
    if extra.get("memory_size"):
        memory = torch.randn((2, 4, 5) if batch_first else (4, 2, 5), dtype=torch.float64)
        kwargs = {"memory": memory, "memory_lengths": torch.tensor([4, 2])}
    whole, whole_state = m(x, **kwargs)
    time_dim = 1 if batch_first else 0
    outputs, state = [], None
    for step in x.split(1, dim=time_dim):
        y, state = m.stream(step, state, **kwargs)
        outputs.append(y)
    torch.testing.assert_close(torch.cat(outputs, dim=time_dim), whole, atol=1e-12, rtol=1e-10)
    expected = whole_state if isinstance(whole_state, tuple) else (whole_state,)
    got = (state.h, state.c) if isinstance(state, rnnattn_ext.AttentionState) else (
        state if isinstance(state, tuple) else (state,))
    for a, b in zip(got, expected):
        if b is not None:
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_unbatched_stream():
    torch.manual_seed(24)
    m = rnnattn_ext.AttnGRU(3, 4, num_heads=2, window=2).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    whole, _ = m(x)
    first, state = m.stream(x[:2])
    second, _ = m.stream(x[2:], state)
    torch.testing.assert_close(torch.cat([first, second]), whole, atol=1e-12, rtol=1e-10)


def test_stream_refuses_what_it_cannot_continue():
    with pytest.raises(ValueError, match="stream needs a unidirectional module"):
        rnnattn_ext.LSTM(3, 4, bidirectional=True).stream(torch.randn(2, 1, 3))
    with pytest.raises(TypeError, match="state must be an AttentionState"):
        rnnattn_ext.AttnLSTM(3, 4).stream(torch.randn(2, 1, 3), (torch.zeros(1, 1, 4), torch.zeros(1, 1, 4)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("cls", [rnnattn_ext.AttnLSTM, rnnattn_ext.AttnGRU], ids=["AttnLSTM", "AttnGRU"])
def test_stream_from_strided_carried_slots_matches_the_torch_operations(cls, dtype, monkeypatch):
    """A state whose keys and values are strided views (every other row of a wider batch) and whose
    h is expanded continues as through the torch operations, bit for bit, whichever states the new
    slots come from: h_0 alone (one step), h_0 and the outputs (2 steps, window 4), outputs only (5)."""
    torch.manual_seed(31)
    m = cls(6, 8, num_heads=2, head_dim=3, window=4).to(dtype).eval()
    with torch.no_grad():
        _, state = m.stream(torch.randn(3, 5, 6, dtype=dtype))

        def strided(slots):
            wide = torch.randn(slots.shape[0], 10, slots.shape[2], dtype=dtype)
            wide[:, ::2] = slots
            return wide[:, ::2]

        h = state.h[:, :1].expand(-1, 5, -1)  # every row's state the same, stride 0
        state = rnnattn_ext.AttentionState(h, None if state.c is None else state.c.clone(),
                                           [strided(k) for k in state.keys], [strided(v) for v in state.values])
        for steps in (1, 2, 5):
            x = torch.randn(steps, 5, 6, dtype=dtype)
            y, after = m.stream(x, state)
            with monkeypatch.context() as patch:
                patch.setattr(_ops, "run_attention_layers", lambda *args, **kwargs: None)
                expected_y, expected = m.stream(x, state)
            assert torch.equal(y, expected_y)
            for got, want in zip(after.keys + after.values, expected.keys + expected.values):
                assert got.shape == (3, 5, 6) and torch.equal(got, want)


def test_carried_slots_needs_both_past_keys_and_values():
    x, states, weights, _ = attention_args("gru", 2, 3, 4, 6, 2, 3, generator=torch.Generator().manual_seed(1))
    y, _, _, _ = functional.attention_layer("gru", x, states, weights, 2, 3)
    keys, values = functional.carried_slots(states[0], y, weights, 3)
    with pytest.raises(ValueError, match="past_keys and past_values come together"):
        functional.carried_slots(states[0], y, weights, 3, past_keys=keys)
    with pytest.raises(TypeError, match="weights must hold w_k and w_v"):
        functional.carried_slots(states[0], y, [*weights[:6], None, *weights[7:]], 3)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("extra", [{"window": 3}, {"window": None}, {"memory_size": 5, "batch_first": True}],
                         ids=["window", "unbounded", "external"])
def test_stream_need_weights_gives_forwards_weights_chunk_by_chunk(extra, device):
    torch.manual_seed(25)
    m = rnnattn_ext.AttnLSTM(3, 4, num_heads=2, num_layers=2, **extra).to(device=device, dtype=torch.float64)
    steps = sum(CHUNKS)
    x = torch.randn(steps, 2, 3, dtype=torch.float64, device=device)
    kwargs = {}
    if m.memory_size:
        memory = torch.randn(2, 6, 5, dtype=torch.float64, device=device)  # batch first
        kwargs = {"memory": memory, "memory_lengths": torch.tensor([6, 4], device=device)}
    inputs = x.transpose(0, 1) if m.batch_first else x
    whole, _, attentions = m(inputs, need_weights=True, **kwargs)
    if m.batch_first:
        attentions = [a.transpose(0, 1) for a in attentions]
    state, start, outputs = None, 0, []
    for size in CHUNKS:
        chunk = x[start : start + size]
        y, state, weights = m.stream(chunk.transpose(0, 1) if m.batch_first else chunk, state, need_weights=True,
                                     **kwargs)
        outputs.append(y)
        assert len(weights) == 2
        for layer, w in enumerate(weights):
            w = w.transpose(0, 1) if m.batch_first else w
            expected = attentions[layer][start : start + size]
            if m.memory_size is None and m.window is None:
                # Unbounded self memory: the chunk's slots are the carried ones and its own; forward
                # has the whole sequence's, the ones not yet there zero.
                seen = start + size
                assert w.shape[-1] == seen and bool((expected[..., : steps - seen] == 0).all())
                expected = expected[..., steps - seen :]
            torch.testing.assert_close(w, expected, atol=1e-12, rtol=1e-10)
        start += size
    torch.testing.assert_close(torch.cat(outputs, dim=1 if m.batch_first else 0), whole, atol=1e-12, rtol=1e-10)
    # As forward's, the weights carry no gradient (the op's weights output has none); the output does.
    assert not any(w.requires_grad for w in weights) and y.requires_grad


def test_unbatched_stream_need_weights():
    torch.manual_seed(26)
    m = rnnattn_ext.AttnGRU(3, 4, num_heads=2, window=2).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    _, _, (expected,) = m(x, need_weights=True)
    first, state, (w1,) = m.stream(x[:2], need_weights=True)
    second, _, (w2,) = m.stream(x[2:], state, need_weights=True)
    assert w1.shape == (2, 2, 2) and w2.shape == (3, 2, 2)
    torch.testing.assert_close(torch.cat([w1, w2]), expected, atol=1e-12, rtol=1e-10)


def test_stream_need_weights_compiles_without_graph_breaks():
    torch.manual_seed(27)
    m = rnnattn_ext.AttnGRU(3, 4, num_heads=2, window=3).eval()
    x = torch.randn(2, 1, 3)

    def two_chunks(x):
        first, state, w1 = m.stream(x, need_weights=True)
        second, _, w2 = m.stream(x, state, need_weights=True)
        return second, w1[0], w2[0]

    compiled = torch.compile(two_chunks, fullgraph=True, backend="aot_eager")
    for got, expected in zip(compiled(x), two_chunks(x)):
        torch.testing.assert_close(got, expected)
