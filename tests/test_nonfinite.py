"""NaN and Inf in inputs, states and weights propagate as they do through torch.nn (the same
elements end up NaN, the rest agree), forward and backward, without crashing."""

import pytest
import torch

import rnnattn_ext
from rnnattn_ext import functional, reference

from helpers import attention_args

BAD = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def _pair(name):
    torch.manual_seed(0)
    ref = getattr(torch.nn, name)(4, 70, bidirectional=True)
    ours = getattr(rnnattn_ext, name)(4, 70, bidirectional=True)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _same_up_to_nan(a, b, what):
    assert torch.equal(a.isnan(), b.isnan()), f"{what}: NaN in different places"
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, equal_nan=True, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("where", ["input", "h0", "weight_hh_l0"])
@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN"])
def test_non_finite_values_propagate_as_in_torch_nn(name, bad, where):
    ref, ours = _pair(name)
    x = torch.randn(6, 3, 4)
    h0 = torch.randn(2, 3, 70) * 0.5
    if where == "input":
        x[2, 1, 0] = BAD[bad]
    elif where == "h0":
        h0[0, 2, 5] = BAD[bad]
    else:
        with torch.no_grad():
            for module in (ref, ours):
                getattr(module, where)[7, 3] = BAD[bad]
    hx = (h0, torch.zeros_like(h0)) if name == "LSTM" else h0
    outputs = []
    for module in (ref, ours):
        xg = x.clone().requires_grad_(True)
        y, _ = module(xg, hx)
        y.sum().backward()
        outputs.append((y.detach(), xg.grad))
    _same_up_to_nan(outputs[1][0], outputs[0][0], "output")
    _same_up_to_nan(outputs[1][1], outputs[0][1], "input gradient")


@pytest.mark.parametrize("head_dim", [2, 8], ids=["scalar", "vector"])  # the CPU's two attention passes
@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_non_finite_values_in_the_attention_cell_as_in_the_eager_reference(cell, bad, head_dim):
    x, states, weights, _ = attention_args(cell, 6, 3, 4, 8, 2, head_dim, dtype=torch.float32, requires_grad=False)
    x = x.clone()
    x[2, 1, 0] = BAD[bad]
    ours = functional.attention_layer(cell, x, states, weights, 2, 3)
    ref = reference.attention_layer(cell, x, states, *weights, num_heads=2, window=3)
    _same_up_to_nan(ours[0], ref[0], "output")
    _same_up_to_nan(ours[2], ref[2], "context")
