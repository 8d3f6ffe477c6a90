"""Fake (meta) and autograd implementations of the torch.ops.rnnattn operators.

The schemas live in csrc/ops/schemas.cpp, the CPU and CUDA kernels in csrc. Backward of every
forward op is its registered ``*_backward`` op, so torch.compile and torch.export see no Python-only code.
"""

from __future__ import annotations

import torch

from ._loader import load_extension

_C = load_extension()

#: cell name -> (gates, states, workspace planes per step), as the C++ cells define them
CELL_LAYOUTS: dict[str, tuple[int, int, int]] = dict(_C.cell_layouts())

#: the cells that have ops, in the order their ops were added
CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")


def forward_op(cell: str):
    return getattr(torch.ops.rnnattn, f"{cell}_forward").default


def backward_op(cell: str):
    return getattr(torch.ops.rnnattn, f"{cell}_backward").default


def _register(cell: str) -> None:
    gates, num_states, planes = CELL_LAYOUTS[cell]
    fwd_name = f"rnnattn::{cell}_forward"
    bwd_name = f"rnnattn::{cell}_backward"

    def fake_forward(input, *args):
        states = args[:num_states]
        weight_hh = args[num_states + 1]
        training = args[-1]
        steps, batch = input.shape[0], input.shape[1]
        hidden = weight_hh.shape[1]
        output = input.new_empty((steps, batch, hidden))
        finals = [s.new_empty((batch, hidden)) for s in states]
        workspace = input.new_empty((steps, planes, batch, hidden) if training else (0,))
        return (output, *finals, workspace)

    def fake_backward(grad_output, *args):
        grad_states = args[:num_states]
        input = args[num_states]
        states = args[num_states + 1 : 2 * num_states + 1]
        weight_ih, weight_hh = args[2 * num_states + 1], args[2 * num_states + 2]
        return (
            torch.empty_like(input),
            *[torch.empty_like(s) for s in states],
            torch.empty_like(weight_ih),
            torch.empty_like(weight_hh),
            weight_hh.new_empty((weight_hh.shape[0],)),
            weight_hh.new_empty((weight_hh.shape[0],)),
        )

    def setup_context(ctx, inputs, output):
        input = inputs[0]
        states = inputs[1 : 1 + num_states]
        weight_ih, weight_hh, bias_ih, bias_hh, reverse, _training = inputs[1 + num_states :]
        out, workspace = output[0], output[-1]
        ctx.save_for_backward(input, *states, weight_ih, weight_hh, out, workspace)
        ctx.reverse = reverse
        ctx.has_bias = (bias_ih is not None, bias_hh is not None)

    def backward(ctx, grad_output, *grads):
        grad_finals = grads[:num_states]  # the workspace's gradient (last) is ignored
        saved = ctx.saved_tensors
        input = saved[0]
        states = saved[1 : 1 + num_states]
        weight_ih, weight_hh, out, workspace = saved[1 + num_states :]
        grad_finals = [g if g is not None else torch.zeros_like(s) for g, s in zip(grad_finals, states)]
        if grad_output is None:
            grad_output = torch.zeros_like(out)
        result = backward_op(cell)(
            grad_output, *grad_finals, input, *states, weight_ih, weight_hh, out, workspace, ctx.reverse
        )
        grad_input = result[0]
        grad_states = result[1 : 1 + num_states]
        grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh = result[1 + num_states :]
        return (
            grad_input,
            *grad_states,
            grad_w_ih,
            grad_w_hh,
            grad_b_ih if ctx.has_bias[0] else None,
            grad_b_hh if ctx.has_bias[1] else None,
            None,
            None,
        )

    torch.library.register_fake(fwd_name)(fake_forward)
    torch.library.register_fake(bwd_name)(fake_backward)
    torch.library.register_autograd(fwd_name, backward, setup_context=setup_context)


for _cell in CELLS:
    _register(_cell)

