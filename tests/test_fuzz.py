"""Property-based fuzzing against the references: random cells, shapes, strides, dtypes, lengths,
projections, attention memories, windows and heads; forward and every gradient must match the
plain-PyTorch reference, and nothing may crash.

RNNATTN_FUZZ_EXAMPLES sets the number of cases (default 2000, a CI-sized run; raise it for a longer
one) and RNNATTN_FUZZ_DEVICE the device (default cpu). Cases are derandomized: a CI run is repeatable.
RNNATTN_FUZZ_SEED=N draws another, equally repeatable, set of cases: a long run can be split over
several processes with different seeds.
"""

from __future__ import annotations


import pytest
import torch

from rnnattn_ext import _ops, functional, reference

from fuzzing import DEVICE, fuzz_settings  # skips without hypothesis
import hypothesis
from hypothesis import given
from hypothesis import strategies as st

GATES = {cell: layout[0] for cell, layout in _ops.CELL_LAYOUTS.items()}
NUM_STATES = {cell: layout[1] for cell, layout in _ops.CELL_LAYOUTS.items()}
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# Against the float64 reference on the same inputs: float64 must agree to rounding; the others within
# what their rounding allows over a few steps of a small layer (fp16/bf16 compute in fp32).
TOLERANCE = {torch.float64: (1e-9, 1e-7), torch.float32: (2e-4, 2e-3), torch.float16: (4e-2, 4e-2),
             torch.bfloat16: (8e-2, 8e-2)}


@st.composite
def cases(draw):
    cell = draw(st.sampled_from(_ops.CELLS))
    # (Batches 16 and 21 split the CPU loop by rows: at least 8 a thread.)
    steps, batch = draw(st.integers(1, 6)), draw(st.integers(1, 4) | st.sampled_from([16, 21]))
    case = {
        "cell": cell, "steps": steps, "batch": batch, "input_size": draw(st.integers(1, 6)),
        # Small widths, and some over 64 units: the CPU then splits the units into one block per thread.
        "hidden": draw(st.integers(1, 9) | st.sampled_from([64, 70, 100])), "bias": draw(st.booleans()),
        "reverse": draw(st.booleans()),
        "dtype": draw(st.sampled_from(DTYPES)), "seed": draw(st.integers(0, 2**31 - 1)),
        "input_layout": draw(st.sampled_from(["contiguous", "batch_first_view", "strided"])),
        "expanded_states": draw(st.booleans()), "transposed_weights": draw(st.booleans()),
        "lengths": draw(st.none() | st.lists(st.integers(1, steps), min_size=batch, max_size=batch)),
        "attention": draw(st.sampled_from([None, "self", "external"])),
        "proj": None,
    }
    if cell in _ops.PROJECTED_CELLS and case["hidden"] >= 2 and draw(st.booleans()):
        case["proj"] = draw(st.integers(1, case["hidden"] - 1))
    if case["attention"] is not None:
        case["heads"], case["head_dim"] = draw(st.integers(1, 3)), draw(st.integers(1, 3))
        case["window"] = draw(st.none() | st.integers(1, steps + 2))
        slots = draw(st.integers(1, 4))
        case["memory_slots"] = slots
        case["memory_width"] = draw(st.integers(1, 5))
        case["memory_lengths"] = draw(st.none() | st.lists(st.integers(1, slots), min_size=batch, max_size=batch))
    return case


def build(case):
    """Leaf tensors (float64, on DEVICE) and how the op sees each (dtype, layout)."""
    gen = torch.Generator().manual_seed(case["seed"])
    cell, T, B, I, H = case["cell"], case["steps"], case["batch"], case["input_size"], case["hidden"]
    G, HS = GATES[cell], case["proj"] or H

    def rand(*shape, scale=1.0):
        return ((torch.rand(*shape, generator=gen, dtype=torch.float64) * 2 - 1) * scale).to(DEVICE)

    k = H ** -0.5
    leaves = {"input": rand(B, T, I) if case["input_layout"] == "batch_first_view" else rand(T, B, I)}
    for s in range(NUM_STATES[cell]):
        width = HS if s == 0 else H
        leaves[f"state{s}"] = rand(1, width) if case["expanded_states"] else rand(B, width)
    leaves["weight_ih"], leaves["weight_hh"] = rand(G * H, I, scale=k), rand(G * H, HS, scale=k)
    if case["bias"]:
        leaves["bias_ih"], leaves["bias_hh"] = rand(G * H, scale=k), rand(G * H, scale=k)
    if case["proj"]:
        leaves["weight_hr"] = rand(case["proj"], H, scale=k)
    if case["attention"]:
        D = case["heads"] * case["head_dim"]
        M = HS if case["attention"] == "self" else case["memory_width"]
        leaves["weight_q"], leaves["weight_k"] = rand(D, HS, scale=2 * HS ** -0.5), rand(D, M, scale=2 * M ** -0.5)
        leaves["weight_v"], leaves["weight_c"] = rand(D, M, scale=M ** -0.5), rand(G * H, D, scale=D ** -0.5)
        if case["bias"]:
            for name in ("bias_q", "bias_k", "bias_v"):
                leaves[name] = rand(D, scale=0.5)
        if case["attention"] == "external":
            leaves["memory"] = rand(case["memory_slots"], B, M)
    return leaves


def arguments(case, leaves, dtype):
    """The call's arguments from the leaves, in `dtype` and the case's layouts."""
    B = case["batch"]

    def view(name):
        t = leaves.get(name)
        if t is None:
            return None
        t = t.to(dtype)
        if name == "input":
            if case["input_layout"] == "batch_first_view":
                return t.transpose(0, 1)
            if case["input_layout"] == "strided":
                wide = torch.zeros(t.shape[0], t.shape[1], 2 * t.shape[2], dtype=dtype, device=t.device)
                wide = wide.index_add(2, torch.arange(0, 2 * t.shape[2], 2, device=t.device), t)
                return wide[:, :, ::2]
            return t
        if name.startswith("state"):
            return t.expand(B, t.shape[1]) if case["expanded_states"] else t
        if case["transposed_weights"] and t.dim() == 2:
            return t.t().contiguous().t()
        return t

    states = [view(f"state{s}") for s in range(NUM_STATES[case["cell"]])]
    names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    base = [view(n) for n in names]
    extra = {}
    if case["attention"]:
        extra = {n: view(n) for n in ("weight_q", "bias_q", "weight_k", "bias_k", "weight_v", "bias_v", "weight_c",
                                      "memory")}
    return view("input"), states, base, view("weight_hr"), extra


def run(impl, case, leaves, dtype):
    x, states, base, weight_hr, extra = arguments(case, leaves, dtype)
    device = leaves["input"].device
    lengths = None if case["lengths"] is None else torch.tensor(case["lengths"], device=device)
    if not case["attention"]:
        if impl is functional:
            out, finals = functional.layer(case["cell"], x, states, *base, reverse=case["reverse"], lengths=lengths,
                                           weight_hr=weight_hr)
        else:
            out, finals = reference.layer(case["cell"], x, states, *base, reverse=case["reverse"], lengths=lengths,
                                          weight_hr=weight_hr)
        return [out, *finals]
    memory_lengths = None
    if case["attention"] == "external" and case["memory_lengths"] is not None:
        memory_lengths = torch.tensor(case["memory_lengths"], device=device)
    window = case["window"] if case["attention"] == "self" else None
    attn = [extra[n] for n in ("weight_q", "bias_q", "weight_k", "bias_k", "weight_v", "bias_v", "weight_c")]
    if impl is functional:
        weights = (*base, *attn) + ((weight_hr,) if weight_hr is not None else ())
        out, finals, context, _ = functional.attention_layer(
            case["cell"], x, states, weights, case["heads"], window, extra["memory"], memory_lengths,
            reverse=case["reverse"], lengths=lengths)
    else:
        out, finals, context, _ = reference.attention_layer(
            case["cell"], x, states, *base, *attn, num_heads=case["heads"], window=window, memory=extra["memory"],
            memory_lengths=memory_lengths, reverse=case["reverse"], lengths=lengths, weight_hr=weight_hr)
    return [out, *finals, context]


@fuzz_settings("RNNATTN_FUZZ_EXAMPLES", 2000)
@given(cases())
def test_ops_match_the_references(case):
    leaves = build(case)
    dtype = case["dtype"]
    atol, rtol = TOLERANCE[dtype]
    for t in leaves.values():
        t.requires_grad_(True)
    ours = run(functional, case, leaves, dtype)
    expected = run(reference, case, leaves, torch.float64)
    gen = torch.Generator().manual_seed(case["seed"] + 1)
    cotangents = [torch.rand(e.shape, generator=gen, dtype=torch.float64).to(e.device) for e in expected]
    for i, (got, want) in enumerate(zip(ours, expected)):
        assert got.dtype == dtype and got.shape == want.shape, (i, got.dtype, got.shape, want.shape)
        torch.testing.assert_close(got.double(), want.detach(), atol=atol, rtol=rtol, msg=lambda m: f"output {i}: {m}")
    if case["cell"] == "rnn_relu" and any(((o > 0) != (e > 0)).any() for o, e in zip(ours[:2], expected[:2])):
        # A pre-activation within rounding of 0 took the other side of relu's kink (16-bit storage
        # rounds it): the derivative there is 1 in one and 0 in the other, both right. The outputs
        # agreed above; such a case's gradients are not compared.
        hypothesis.event("relu kink straddled: gradients not compared")
        return
    names = list(leaves)
    ours_grads = torch.autograd.grad([(o.double() * c).sum() for o, c in zip(ours, cotangents)], list(leaves.values()),
                                     allow_unused=True)
    expected_grads = torch.autograd.grad([(e * c).sum() for e, c in zip(expected, cotangents)], list(leaves.values()),
                                         allow_unused=True)
    for name, got, want in zip(names, ours_grads, expected_grads):
        if want is None:
            assert got is None or not got.abs().any(), name
            continue
        assert got is not None, name
        scale = 1.0 + want.abs().max().item()
        torch.testing.assert_close(got, want, atol=atol * scale * case["steps"], rtol=rtol,
                                   msg=lambda m: f"gradient of {name}: {m}")
