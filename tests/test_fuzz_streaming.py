"""Property-based fuzzing of streaming against one call over the whole sequence: random modules (every
cell, attention with self or external memory, windows, heads, projections, stacked layers, widths
that split the units over threads, HybridBlock over every cell), random layouts (batch first, unbatched), initial states, chunk
sizes for ``stream``, and a ``streamer()`` stepping the same sequence with a state handed back and
forth mid-way and, after it, a second sequence (a new external memory, another batch). Outputs, final
states and attention weights must match ``forward``'s.

RNNATTN_FUZZ_STREAM_EXAMPLES sets the number of cases (default 300, a CI-sized run), RNNATTN_FUZZ_DEVICE
the device (default cpu), RNNATTN_FUZZ_SEED another repeatable set of cases (as tests/test_fuzz.py).
"""

from __future__ import annotations

import copy

import pytest
import torch

import rnnattn_ext

from fuzzing import DEVICE, fuzz_settings  # skips without hypothesis
from hypothesis import given
from hypothesis import strategies as st

KINDS = {
    "LSTM": (rnnattn_ext.LSTM, {}), "GRU": (rnnattn_ext.GRU, {}), "RNN": (rnnattn_ext.RNN, {}),
    "RNN_relu": (rnnattn_ext.RNN, {"nonlinearity": "relu"}), "AttnLSTM": (rnnattn_ext.AttnLSTM, {}),
    "AttnGRU": (rnnattn_ext.AttnGRU, {}), "AttnRNN": (rnnattn_ext.AttnRNN, {}),
    "AttnRNN_relu": (rnnattn_ext.AttnRNN, {"nonlinearity": "relu"}),
    **{f"Hybrid_{cell}": (rnnattn_ext.HybridBlock, {"cell": cell}) for cell in ("lstm", "gru", "rnn_tanh", "rnn_relu")},
}


def has_cell_state(case):
    return case["kind"] in ("LSTM", "AttnLSTM", "Hybrid_lstm")
# Streaming and one call multiply in products of other shapes (one step, a chunk, the whole
# sequence): equal to rounding, in the module's dtype.
TOLERANCE = {torch.float64: {"atol": 1e-10, "rtol": 1e-8}, torch.float32: {"atol": 2e-5, "rtol": 1e-4}}


@st.composite
def cases(draw):
    kind = draw(st.sampled_from(sorted(KINDS)))
    attention, hybrid = kind.startswith("Attn"), kind.startswith("Hybrid")
    steps = draw(st.integers(1, 8))
    # Small widths, and some of 64 units and more: the CPU then splits the units over its threads
    # (a one-step call splits the weights' reads from 256 up); batch 16 splits it by rows instead.
    hidden = draw(st.integers(1, 9) | st.sampled_from([64, 70, 130, 256]))
    case = {
        "kind": kind, "steps": steps, "hidden": hidden, "input_size": draw(st.integers(1, 6)),
        "num_layers": draw(st.integers(1, 2)), "bias": draw(st.booleans()), "batch_first": draw(st.booleans()),
        "batch": draw(st.none() | st.integers(1, 4) | st.sampled_from([16])), "with_hx": draw(st.booleans()),
        "dtype": draw(st.sampled_from([torch.float64, torch.float32])), "seed": draw(st.integers(0, 2**31 - 1)),
        "proj_size": 0, "chunks": draw(st.lists(st.integers(1, 5), min_size=1, max_size=steps)),
        "handback_at": draw(st.integers(0, steps)), "second_steps": draw(st.integers(0, 3)),
        "second_batch": None, "need_weights": attention and draw(st.booleans()),
    }
    if kind.endswith("LSTM") and hidden >= 2 and draw(st.booleans()):
        case["proj_size"] = draw(st.integers(1, hidden - 1))
    if attention or hybrid:
        case["num_heads"], case["head_dim"] = draw(st.integers(1, 3)), draw(st.integers(1, 4))
        case["memory_size"] = None if hybrid else draw(st.none() | st.integers(1, 5))
        case["window"] = None if case["memory_size"] else draw(st.none() | st.integers(1, steps + 2))
        case["memory_slots"] = draw(st.integers(1, 4))
        case["memory_lengths"] = case["batch"] is not None and draw(st.booleans())
    if case["batch"] is not None and case["second_steps"] and (not attention or case["memory_size"]):
        case["second_batch"] = draw(st.integers(1, 4))  # a new sequence may change the batch
    return case


def build(case):
    """The module (in the case's dtype, eval mode) and its float64 twin with the same weights."""
    torch.manual_seed(case["seed"])
    cls, extra = KINDS[case["kind"]]
    extra = dict(extra, num_layers=case["num_layers"], bias=case["bias"], batch_first=case["batch_first"])
    if case["proj_size"]:
        extra["proj_size"] = case["proj_size"]
    if case["kind"].startswith("Attn"):
        extra.update(num_heads=case["num_heads"], head_dim=case["head_dim"], window=case["window"],
                     memory_size=case["memory_size"])
    if case["kind"].startswith("Hybrid"):
        extra.update(num_heads=case["num_heads"], head_dim=case["head_dim"], window=case["window"])
    reference = cls(case["input_size"], case["hidden"], **extra).to(device=DEVICE, dtype=torch.float64).eval()
    return copy.deepcopy(reference).to(case["dtype"]), reference


def sequence(case, batch, steps, gen):
    """Input, initial state (or None) and memory keywords of one sequence, in the module's layout."""
    I, L, H = case["input_size"], case["num_layers"], case["hidden"]
    width = case["proj_size"] or H
    dtype = case["dtype"]

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=DEVICE, dtype=dtype)

    lead = () if batch is None else (batch,)
    x = rand(steps, *lead, I)
    if batch is not None and case["batch_first"]:
        x = x.transpose(0, 1)
    hx = None
    if case["with_hx"]:
        hx = rand(L, *lead, width)
        if has_cell_state(case):
            hx = (hx, rand(L, *lead, H))
    memory = {}
    if case["kind"].startswith("Attn") and case["memory_size"]:
        S = case["memory_slots"]
        mem = rand(S, *lead, case["memory_size"])
        memory["memory"] = mem.transpose(0, 1) if batch is not None and case["batch_first"] else mem
        if case["memory_lengths"] and batch is not None:
            memory["memory_lengths"] = torch.randint(1, S + 1, (batch,), generator=gen).to(DEVICE)
    return x, hx, memory


def time_axis(case, batch):
    return 1 if batch is not None and case["batch_first"] else 0


def whole(module, case, x, hx, memory):
    """forward over the whole sequence: outputs, final states (a tuple) and weights (or None)."""
    with torch.no_grad():
        if case["need_weights"]:
            output, finals, weights = module(x, hx, need_weights=True, **memory)
        else:
            output, finals = module(x, hx, **memory)
            weights = None
    return output, finals if isinstance(finals, tuple) else (finals,), weights


def as_stream_state(module, hx):
    if hx is not None and isinstance(module, rnnattn_ext.HybridBlock):
        return rnnattn_ext.HybridState(hx, None, None)
    if hx is None or not isinstance(module, rnnattn_ext.attention_modules.AttentionRecurrentBase):
        return hx
    h, c = hx if isinstance(hx, tuple) else (hx, None)
    return rnnattn_ext.AttentionState(h, c, None, None)


def finals_of(state):
    """A stream or streamer state's h (and c) as forward returns them."""
    if isinstance(state, rnnattn_ext.HybridState):
        state = state.hidden
    if isinstance(state, rnnattn_ext.AttentionState):
        return (state.h,) if state.c is None else (state.h, state.c)
    return state if isinstance(state, tuple) else (state,)


def right_aligned(a, b):
    """Unbounded self memory's weights: forward pads the slots with zeros before the first, a stream
    chunk or step has the slots seen so far. Pads the shorter on the left to compare them."""
    width = max(a.shape[-1], b.shape[-1])
    return tuple(torch.nn.functional.pad(t, (width - t.shape[-1], 0)) for t in (a, b))


def check_weights(case, got, expected):
    if case["kind"].startswith("Attn") and not case["memory_size"] and case["window"] is None:
        got, expected = right_aligned(got, expected)
    torch.testing.assert_close(got, expected, **TOLERANCE[case["dtype"]])


def check_stream(module, case, x, hx, memory, expected):
    """module.stream over the case's chunks (the last one repeated to the end) carrying the state."""
    output, finals, weights = expected
    axis, steps = time_axis(case, case["batch"]), case["steps"]
    start, state, index = 0, as_stream_state(module, hx), 0
    outputs = []
    with torch.no_grad():
        while start < steps:
            size = min(case["chunks"][min(index, len(case["chunks"]) - 1)], steps - start)
            chunk = x.narrow(axis, start, size)
            if case["need_weights"]:
                y, state, chunk_weights = module.stream(chunk, state, need_weights=True, **memory)
                for layer, w in enumerate(chunk_weights):
                    check_weights(case, w, weights[layer].narrow(axis, start, size))
            else:
                y, state = module.stream(chunk, state, **memory)
            outputs.append(y)
            start, index = start + size, index + 1
    tolerance = TOLERANCE[case["dtype"]]
    torch.testing.assert_close(torch.cat(outputs, axis), output, **tolerance)
    for mine, theirs in zip(finals_of(state), finals, strict=True):
        torch.testing.assert_close(mine, theirs, **tolerance)


def step_through(streamer, case, x, batch, expected, handback_at=None):
    """streamer.step over every step of x, handing its state back to it (reset(state)) before step
    handback_at; the outputs, final state and weights must be forward's."""
    output, finals, weights = expected
    axis = time_axis(case, batch)
    tolerance = TOLERANCE[case["dtype"]]
    for t in range(x.shape[axis]):
        if t == handback_at:
            streamer.reset(streamer.state)
        frame = x.select(axis, t)
        if case["need_weights"]:
            y, step_weights = streamer.step(frame, need_weights=True)
            for layer, w in enumerate(step_weights):
                check_weights(case, w, weights[layer].select(axis, t))
        else:
            y = streamer.step(frame)
        torch.testing.assert_close(y, output.select(axis, t), **tolerance)
    for mine, theirs in zip(finals_of(streamer.state), finals, strict=True):
        torch.testing.assert_close(mine, theirs, **tolerance)


@fuzz_settings("RNNATTN_FUZZ_STREAM_EXAMPLES", 300)
@given(cases())
def test_streaming_matches_one_call(case):
    module, reference = build(case)
    gen = torch.Generator().manual_seed(case["seed"])
    x, hx, memory = sequence(case, case["batch"], case["steps"], gen)
    expected = whole(module, case, x, hx, memory)
    # The module's dtype against float64: streaming is checked against the former, which must itself
    # be right.
    if case["dtype"] != torch.float64:
        hx64 = None if hx is None else tuple(t.double() for t in hx) if isinstance(hx, tuple) else hx.double()
        memory64 = {k: v.double() if v.is_floating_point() else v for k, v in memory.items()}
        exact = whole(reference, case, x.double(), hx64, memory64)
        torch.testing.assert_close(expected[0].double(), exact[0], atol=2e-4, rtol=2e-3)

    check_stream(module, case, x, hx, memory, expected)

    streamer = module.streamer(**memory)
    if hx is not None:
        streamer.reset(as_stream_state(module, hx))
    step_through(streamer, case, x, case["batch"], expected, handback_at=case["handback_at"])

    if case["second_steps"]:
        # The next sequence: from zeros, over a new memory for a decoder (another batch allowed).
        batch = case["second_batch"] if case["second_batch"] is not None else case["batch"]
        second = dict(case, with_hx=False)
        x2, _, memory2 = sequence(second, batch, case["second_steps"], gen)
        streamer.reset(**memory2)
        step_through(streamer, second, x2, batch, whole(module, second, x2, None, memory2))
