"""Bad arguments to the ops give Python exceptions naming the argument, the expected and the actual value."""

import pytest
import torch

from rnnattn_ext import _ops

from helpers import layer_args, proj


def _call(cell, **overrides):
    x, states, w_ih, w_hh, b_ih, b_hh = layer_args(cell, 4, 3, 5, 6, torch.float32, requires_grad=False)
    args = {"input": x, "w_ih": w_ih, "w_hh": w_hh, "b_ih": b_ih, "b_hh": b_hh}
    for i, s in enumerate(states):
        args[f"s{i}"] = s
    args.update(overrides)
    state_args = [args[f"s{i}"] for i in range(len(states))]
    return _ops.forward_op(cell)(args["input"], *state_args, args["w_ih"], args["w_hh"], args["b_ih"], args["b_hh"],
                                 *proj(cell), args.get("lengths"), False, False)


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
    with pytest.raises(TypeError, match=r"must have the dtype of input \(Half\), got Float"):
        _call(cell, input=torch.randn(4, 3, 5).half())
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64 on the CPU, got Long"):
        _call(cell, input=torch.ones(4, 3, 5, dtype=torch.long))


def _attention_op_args(cell="gru", memory=None):
    from helpers import attention_args

    x, states, weights, mem = attention_args(cell, 4, 2, 3, 6, 2, 2, memory, requires_grad=False)
    return x, states, list(weights), mem


@pytest.mark.parametrize("change,error,match", [
    (lambda a: a.update(heads=3), ValueError,
     "num_heads must divide the attention width D = weight_q.size\\(0\\) = 4, got num_heads = 3"),
    (lambda a: a.update(heads=0), ValueError, "num_heads must be >= 1, got 0"),
    (lambda a: a.update(window=0), ValueError, "window must be >= 1 or None \\(unbounded\\), got 0"),
    (lambda a: a["weights"].__setitem__(4, torch.zeros(4, 5, dtype=torch.float64)), ValueError,
     "weight_q must have shape \\(D, H\\) = \\[4, 6\\], got \\[4, 5\\]"),
    (lambda a: a["weights"].__setitem__(10, torch.zeros(18, 3, dtype=torch.float64)), ValueError,
     "weight_c must have shape \\(G\\*H, D\\) = \\[18, 4\\], got \\[18, 3\\]"),
    (lambda a: a["weights"].__setitem__(5, torch.zeros(4, dtype=torch.float32)), TypeError,
     "bias_q must have the dtype of input"),
    (lambda a: a.update(lengths=torch.tensor([1, 2])), ValueError, "memory_lengths needs an external memory"),
])
def test_attention_op_argument_errors(change, error, match):
    x, states, weights, mem = _attention_op_args()
    args = dict(weights=weights, heads=2, window=2, lengths=None)
    change(args)
    with pytest.raises(error, match=match):
        torch.ops.rnnattn.gru_attn_forward(x, *states, *args["weights"], mem, args["lengths"], None, None, None, args["heads"],
                                           args["window"], False, False, False)


@pytest.mark.parametrize("memory,lengths,error,match", [
    (torch.zeros(3, 5, 5, dtype=torch.float64), None, ValueError, "memory must have shape \\(S, B, M\\) with B = 2"),
    (torch.zeros(3, 2, 5, dtype=torch.float32), None, TypeError, "memory must have the dtype of input"),
    (torch.zeros(3, 2, 5, dtype=torch.float64), torch.tensor([1, 4]), ValueError,
     "memory_lengths must lie in \\[1, S\\] = \\[1, 3\\], got values in \\[1, 4\\]"),
    (torch.zeros(3, 2, 5, dtype=torch.float64), torch.tensor([1, 2], dtype=torch.int32), TypeError,
     "memory_lengths must be int64, got Int"),
    (torch.zeros(3, 2, 5, dtype=torch.float64), torch.tensor([1, 2, 3]), ValueError,
     "memory_lengths must have shape \\(B,\\) = \\[2\\], got \\[3\\]"),
    (torch.zeros(3, 2, 7, dtype=torch.float64), None, ValueError,
     "weight_k must have shape \\(D, M\\) with M = memory.size\\(2\\) = \\[4, 7\\], got \\[4, 5\\]"),
])
def test_attention_op_memory_errors(memory, lengths, error, match):
    x, states, weights, _ = _attention_op_args(memory=3)
    with pytest.raises(error, match=match):
        torch.ops.rnnattn.gru_attn_forward(x, *states, *weights, memory, lengths, None, None, None, 2, None, False, False, False)


def test_attention_backward_after_inference_forward_says_why():
    x, states, weights, _ = _attention_op_args()
    result = torch.ops.rnnattn.gru_attn_forward(x, *states, *weights, None, None, None, None, None, 2, 2, False, True, False)
    out, h_n, ctx, _, workspace, _ = result
    w_ih, w_hh, _, _, w_q, _, w_k, _, w_v, _, w_c = weights
    with pytest.raises(ValueError, match="training=False, which saves nothing"):
        torch.ops.rnnattn.gru_attn_backward(out, h_n, None, x, *states, w_ih, w_hh, w_q, w_k, w_v, w_c, None, None,
                                            None, None, None, out, ctx, workspace, torch.empty(0, dtype=torch.float64), 2, 2, False)
