"""Property-based fuzzing of the modules against their peers: LSTM, GRU and RNN against torch.nn with
copied weights, the attention modules (self memory with a window or unbounded, or an external memory
with lengths) against ``reference.attention_stack`` over their own parameters, HybridBlock against
torch.nn's layer and ``reference.causal_self_attention`` over its own parameters. Random cells, widths
(some that split the units over threads), layers, directions, projections, heads, layouts (batch
first, unbatched, a strided view), initial states, PackedSequence input (sorted or not) and the
``lengths`` argument, under no_grad and with gradients for any subset of the input, the states, the
memory and the parameters. Outputs, final states and every gradient must be the peer's.

RNNATTN_FUZZ_MODULE_EXAMPLES sets the number of cases (default 300, a CI-sized run), RNNATTN_FUZZ_DEVICE
the device (default cpu), RNNATTN_FUZZ_SEED another repeatable set of cases (as tests/test_fuzz.py).
"""

from __future__ import annotations


import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import rnnattn_ext
from rnnattn_ext import reference

from fuzzing import DEVICE, fuzz_settings  # skips without hypothesis
from hypothesis import given
from hypothesis import strategies as st

KINDS = {
    "LSTM": (torch.nn.LSTM, rnnattn_ext.LSTM, {}), "GRU": (torch.nn.GRU, rnnattn_ext.GRU, {}),
    "RNN": (torch.nn.RNN, rnnattn_ext.RNN, {}),
    "RNN_relu": (torch.nn.RNN, rnnattn_ext.RNN, {"nonlinearity": "relu"}),
    # The attention modules' peer is the reference (their cell names).
    "AttnLSTM": ("lstm", rnnattn_ext.AttnLSTM, {}), "AttnGRU": ("gru", rnnattn_ext.AttnGRU, {}),
    "AttnRNN": ("rnn_tanh", rnnattn_ext.AttnRNN, {}),
    "AttnRNN_relu": ("rnn_relu", rnnattn_ext.AttnRNN, {"nonlinearity": "relu"}),
    **{f"Hybrid_{cell}": (cell, rnnattn_ext.HybridBlock, {"cell": cell}) for cell in ("lstm", "gru", "rnn_tanh", "rnn_relu")},
}
TORCH_RECURRENT = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn_tanh": torch.nn.RNN, "rnn_relu": torch.nn.RNN}


def has_cell_state(case):
    return case["kind"] in ("LSTM", "AttnLSTM", "Hybrid_lstm")
# torch.nn and ours sum in other orders (and cuDNN in TF32 unless told otherwise: the fuzz turns it off).
TOLERANCE = {torch.float64: {"atol": 1e-9, "rtol": 1e-7}, torch.float32: {"atol": 5e-5, "rtol": 5e-4}}


@st.composite
def cases(draw):
    kind = draw(st.sampled_from(sorted(KINDS)))
    # (Batch 17 splits the CPU loop by rows: at least 8 a thread.)
    steps, batch = draw(st.integers(1, 7)), draw(st.none() | st.integers(1, 5) | st.sampled_from([17]))
    hidden = draw(st.integers(1, 9) | st.sampled_from([64, 70, 130]))
    case = {
        "kind": kind, "steps": steps, "batch": batch, "hidden": hidden, "input_size": draw(st.integers(1, 6)),
        "num_layers": draw(st.integers(1, 3)), "bias": draw(st.booleans()), "batch_first": draw(st.booleans()),
        "bidirectional": draw(st.booleans()), "proj_size": 0, "with_hx": draw(st.booleans()),
        "dtype": draw(st.sampled_from([torch.float64, torch.float32])), "seed": draw(st.integers(0, 2**31 - 1)),
        "strided_input": draw(st.booleans()), "lengths": None, "form": "tensor",
        # What requires grad: nothing (no_grad), or any of the input, the states, the memory, the parameters.
        "grad": draw(st.none() | st.fixed_dictionaries(
            {"input": st.booleans(), "hx": st.booleans(), "memory": st.booleans(), "parameters": st.booleans()})),
        "attention": kind.startswith("Attn"), "hybrid": kind.startswith("Hybrid"),
    }
    if kind.endswith("LSTM") and hidden >= 2 and draw(st.booleans()):
        case["proj_size"] = draw(st.integers(1, hidden - 1))
    if case["attention"]:
        case["num_heads"], case["head_dim"] = draw(st.integers(1, 3)), draw(st.integers(1, 4))
        case["memory_size"] = draw(st.none() | st.integers(1, 5))
        case["window"] = None if case["memory_size"] else draw(st.none() | st.integers(1, steps + 2))
        case["memory_slots"] = draw(st.integers(1, 4))
        case["memory_lengths"] = batch is not None and draw(st.booleans())
    if case["hybrid"]:
        case["num_heads"], case["head_dim"] = draw(st.integers(1, 3)), draw(st.integers(1, 4))
        case["window"] = draw(st.none() | st.integers(1, steps + 2))
    if batch is not None and draw(st.booleans()):
        case["lengths"] = draw(st.lists(st.integers(1, steps), min_size=batch, max_size=batch))
        # torch.nn takes them packed; ours packed (sorted or not) or as the lengths argument.
        case["form"] = draw(st.sampled_from(["packed_sorted", "packed", "lengths"]))
        if case["form"] == "packed_sorted":
            case["lengths"] = sorted(case["lengths"], reverse=True)
    return case


def build(case):
    torch.manual_seed(case["seed"])
    peer, our_cls, extra = KINDS[case["kind"]]
    extra = dict(extra, num_layers=case["num_layers"], bias=case["bias"], batch_first=case["batch_first"],
                 bidirectional=case["bidirectional"])
    if case["proj_size"]:
        extra["proj_size"] = case["proj_size"]
    wants = bool(case["grad"] and case["grad"]["parameters"])
    if case["hybrid"]:
        extra.update(num_heads=case["num_heads"], head_dim=case["head_dim"], window=case["window"])
        ours = our_cls(case["input_size"], case["hidden"], **extra).to(device=DEVICE, dtype=case["dtype"])
        return peer, ours.requires_grad_(wants)
    if case["attention"]:
        extra.update(num_heads=case["num_heads"], head_dim=case["head_dim"], window=case["window"],
                     memory_size=case["memory_size"])
        ours = our_cls(case["input_size"], case["hidden"], **extra).to(device=DEVICE, dtype=case["dtype"])
        return peer, ours.requires_grad_(wants)
    theirs = peer(case["input_size"], case["hidden"], **extra).to(device=DEVICE, dtype=case["dtype"])
    ours = our_cls(case["input_size"], case["hidden"], **extra).to(device=DEVICE, dtype=case["dtype"])
    ours.load_state_dict(theirs.state_dict())
    for module in (theirs, ours):
        module.requires_grad_(wants)
    return theirs, ours


def inputs(case, gen):
    T, B, I = case["steps"], case["batch"], case["input_size"]
    dtype = case["dtype"]

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=DEVICE, dtype=dtype)

    lead = () if B is None else (B,)
    if B is not None and case["batch_first"]:
        x = rand(B, T, 2 * I)
    else:
        x = rand(T, *lead, 2 * I)
    x = x[..., ::2] if case["strided_input"] else x[..., :I].contiguous()
    hx = None
    if case["with_hx"]:
        layers = case["num_layers"] * (2 if case["bidirectional"] else 1)
        hx = rand(layers, *lead, case["proj_size"] or case["hidden"])
        if has_cell_state(case):
            hx = (hx, rand(layers, *lead, case["hidden"]))
    memory = {}
    if case["attention"] and case["memory_size"]:
        mem = rand(case["memory_slots"], *lead, case["memory_size"])
        memory["memory"] = mem.transpose(0, 1) if B is not None and case["batch_first"] else mem
        if case["memory_lengths"]:
            memory["memory_lengths"] = torch.randint(1, case["memory_slots"] + 1, (B,), generator=gen).to(DEVICE)
    grad = case["grad"] or {}
    x.requires_grad_(grad.get("input", False))
    for t in (hx if isinstance(hx, tuple) else (hx,) if hx is not None else ()):
        t.requires_grad_(grad.get("hx", False))
    if "memory" in memory:
        memory["memory"].requires_grad_(grad.get("memory", False))
    return x, hx, memory


def packed(case, x, enforce_sorted):
    lengths = torch.tensor(case["lengths"])
    return pack_padded_sequence(x, lengths, batch_first=case["batch_first"], enforce_sorted=enforce_sorted)


def run(case, module, x, hx, memory, is_ours):
    """The module's outputs (a padded output, zeros past each row's length) and final states."""
    if case["form"] == "tensor":
        output, finals = module(x, hx, **memory)
    elif case["form"] == "lengths" and is_ours:
        output, finals = module(x, hx, lengths=torch.tensor(case["lengths"], device=DEVICE), **memory)
    else:
        output, finals = module(packed(case, x, case["form"] == "packed_sorted"), hx, **memory)
        assert isinstance(output, PackedSequence)
        output, _ = pad_packed_sequence(output, batch_first=case["batch_first"], total_length=case["steps"])
    return [output, *(finals if isinstance(finals, tuple) else (finals,))]


def run_reference(case, module, x, hx, memory):
    """reference.attention_stack over the module's own parameters, in the module's layout."""
    unbatched, batch_first = case["batch"] is None, case["batch_first"] and case["batch"] is not None
    x = x.unsqueeze(1) if unbatched else x.transpose(0, 1) if batch_first else x
    widths = [module.state_size] + ([module.hidden_size] if case["kind"].endswith("LSTM") else [])
    directions = 2 if case["bidirectional"] else 1
    if hx is None:
        states = [x.new_zeros(case["num_layers"] * directions, x.shape[1], width) for width in widths]
    else:
        states = [s.unsqueeze(1) if unbatched else s for s in (hx if isinstance(hx, tuple) else (hx,))]
    mem = memory.get("memory")
    if mem is not None:
        mem = mem.unsqueeze(1) if unbatched else mem.transpose(0, 1) if batch_first else mem
    lengths = None if case["lengths"] is None else torch.tensor(case["lengths"], device=DEVICE)
    output, finals, _ = reference.attention_stack(
        KINDS[case["kind"]][0], x, states, [tuple(w) for w in module._attention_weights()], case["num_layers"],
        case["bidirectional"], case["num_heads"], case["window"], mem, memory.get("memory_lengths"), lengths)
    output = output.squeeze(1) if unbatched else output.transpose(0, 1) if batch_first else output
    return [output, *(f.squeeze(1) if unbatched else f for f in finals)]


def run_hybrid_reference(case, block, x, hx):
    """torch.nn's recurrent layer over the block's own recurrent parameters (given the case's input
    form, the lengths packed), then reference.causal_self_attention, zeros past each row's length."""
    rec = block.recurrent
    kwargs = {"nonlinearity": block.cell[4:]} if block.cell.startswith("rnn_") else {}
    twin = TORCH_RECURRENT[block.cell](rec.input_size, rec.hidden_size, num_layers=rec.num_layers, bias=case["bias"],
                                       batch_first=case["batch_first"], bidirectional=rec.bidirectional,
                                       device=DEVICE, dtype=case["dtype"], **kwargs)
    parameters = dict(rec.named_parameters())

    def recurrent(inp, h):
        return torch.func.functional_call(twin, parameters, (inp, h))

    y, *finals = run(dict(case, form="packed" if case["form"] == "lengths" else case["form"]), recurrent, x, hx, {},
                     is_ours=False)
    unbatched, batch_first = case["batch"] is None, case["batch_first"] and case["batch"] is not None
    seq = y.unsqueeze(1) if unbatched else y.transpose(0, 1) if batch_first else y
    output = reference.causal_self_attention(seq, block.query.weight, block.query.bias, block.key.weight,
                                             block.key.bias, block.value.weight, block.value.bias, block.out.weight,
                                             block.out.bias, block.num_heads, block.window)
    if case["lengths"] is not None:
        past_end = torch.arange(case["steps"], device=DEVICE).view(-1, 1) >= torch.tensor(case["lengths"], device=DEVICE)
        output = output.masked_fill(past_end.unsqueeze(-1), 0)
    output = output.squeeze(1) if unbatched else output.transpose(0, 1) if batch_first else output
    return [output, *finals]


@fuzz_settings("RNNATTN_FUZZ_MODULE_EXAMPLES", 300)
@given(cases())
def test_modules_match_their_peers(case):
    theirs, ours = build(case)
    gen = torch.Generator().manual_seed(case["seed"])
    x, hx, memory = inputs(case, gen)
    tolerance = TOLERANCE[case["dtype"]]
    with torch.backends.cudnn.flags(allow_tf32=False), torch.set_grad_enabled(case["grad"] is not None):
        if case["attention"]:
            expected = run_reference(case, ours, x, hx, memory)
        elif case["hybrid"]:
            expected = run_hybrid_reference(case, ours, x, hx)
        else:
            expected = run(case, theirs, x, hx, memory, is_ours=False)
        got = run(case, ours, x, hx, memory, is_ours=True)
    assert len(got) == len(expected)
    for name, mine, reference in zip(["output", "h_n", "c_n"], got, expected):
        torch.testing.assert_close(mine, reference, **tolerance, msg=lambda m, name=name: f"{name}: {m}")
    if case["grad"] is None:
        assert not any(t.requires_grad for t in got)
        return
    states = list(hx) if isinstance(hx, tuple) else [hx] if hx is not None else []
    shared_leaves = [t for t in [x, *states, *memory.values()] if t.requires_grad]
    ours_params = [p for p in ours.parameters() if p.requires_grad]
    # The reference runs on our module's own parameters.
    their_params = ours_params if case["attention"] or case["hybrid"] else [
        p for p in theirs.parameters() if p.requires_grad]
    if not shared_leaves and not ours_params:
        assert not any(t.requires_grad for t in got)
        return
    weights = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t) for t in expected]
    loss = lambda outputs: sum((t * w).sum() for t, w in zip(outputs, weights))  # noqa: E731
    their_grads = torch.autograd.grad(loss(expected), shared_leaves + their_params, allow_unused=True)
    our_grads = torch.autograd.grad(loss(got), shared_leaves + ours_params, allow_unused=True)
    names = [f"leaf {i}" for i in range(len(shared_leaves))] + [n for n, p in ours.named_parameters() if p.requires_grad]
    for name, mine, reference in zip(names, our_grads, their_grads, strict=True):
        if reference is None:  # torch.nn's graph does not reach it; ours gives zeros or nothing
            assert mine is None or not bool(mine.any()), name
            continue
        torch.testing.assert_close(mine, reference, atol=tolerance["atol"] * 10, rtol=tolerance["rtol"] * 10,
                                   msg=lambda m, name=name: f"grad {name}: {m}")
