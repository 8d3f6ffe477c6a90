"""Bad arguments to the ops give Python exceptions naming the argument, the expected and the actual value."""

import pytest
import torch

from rnnattn_ext import _ops

from helpers import layer_args


def _call(cell, **overrides):
    x, states, w_ih, w_hh, b_ih, b_hh = layer_args(cell, 4, 3, 5, 6, torch.float32, requires_grad=False)
    args = {"input": x, "w_ih": w_ih, "w_hh": w_hh, "b_ih": b_ih, "b_hh": b_hh}
    for i, s in enumerate(states):
        args[f"s{i}"] = s
    args.update(overrides)
    state_args = [args[f"s{i}"] for i in range(len(states))]
    return _ops.forward_op(cell)(args["input"], *state_args, args["w_ih"], args["w_hh"], args["b_ih"], args["b_hh"],
                                 False, False)


@pytest.mark.parametrize("cell", _ops.CELLS)
def test_shape_errors(cell):
    g = _ops.CELL_LAYOUTS[cell][0]
    with pytest.raises(ValueError, match=r"input must be 3-D \(T, B, I\), got shape \[4, 5\]"):
        _call(cell, input=torch.randn(4, 5))
    with pytest.raises(ValueError, match=r"h0 must have shape \(B, H\) = \[3, 6\], got \[2, 6\]"):
        _call(cell, s0=torch.randn(2, 6))
    with pytest.raises(ValueError, match=rf"weight_ih must have shape \(G\*H, I\) = \[{g * 6}, 5\], got \[{g * 6}, 4\]"):
        _call(cell, w_ih=torch.randn(g * 6, 4))
    with pytest.raises(ValueError, match=rf"weight_hh must have shape \(G\*H, H\) = \[{g * 6}, 6\], got \[{g * 6 + 1}, 6\]"):
        _call(cell, w_hh=torch.randn(g * 6 + 1, 6))
    with pytest.raises(ValueError, match=rf"bias_hh must have shape \(G\*H,\) = \[{g * 6}\], got \[3\]"):
        _call(cell, b_hh=torch.randn(3))
    with pytest.raises(ValueError, match="weight_hh must be 2-D"):
        _call(cell, w_hh=torch.randn(6))


@pytest.mark.parametrize("cell", _ops.CELLS)
def test_dtype_errors(cell):
    with pytest.raises(TypeError, match="weight_ih must have the dtype of input \\(Float\\), got Double"):
        _call(cell, w_ih=torch.randn(_ops.CELL_LAYOUTS[cell][0] * 6, 5, dtype=torch.float64))
    with pytest.raises(TypeError, match="float32 or float64 on the CPU, got Half"):
        _call(cell, input=torch.randn(4, 3, 5).half())
    with pytest.raises(TypeError, match="float32 or float64 on the CPU, got Long"):
        _call(cell, input=torch.ones(4, 3, 5, dtype=torch.long))
