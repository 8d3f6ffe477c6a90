"""Fake (meta) and autograd implementations of the torch.ops.rnnattn operators.

The schemas live in csrc/ops/schemas.cpp, the CPU and CUDA kernels in csrc. Backward of every
forward op is its registered ``*_backward`` op, so torch.compile and torch.export see no Python-only code.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._loader import load_extension

_C = load_extension()

#: cell name -> (gates, states, workspace planes per step), as the C++ cells define them
CELL_LAYOUTS: dict[str, tuple[int, int, int]] = dict(_C.cell_layouts())

#: the cells that have ops, in the order their ops were added
CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")

#: the cells whose ops take ``weight_hr`` (torch.nn's proj_size) after ``bias_hh``, and return its
#: gradient last from backward
PROJECTED_CELLS = ("lstm",)


def _widths(cell: str, weight_hh: Tensor, weight_hr: Tensor | None) -> tuple[int, int]:
    """(H, width of h): the projection's P with weight_hr, else H."""
    hidden = weight_hh.shape[0] // CELL_LAYOUTS[cell][0]
    return hidden, hidden if weight_hr is None else weight_hr.shape[0]


def _state_shapes(batch: int, num_states: int, hidden: int, state_width: int) -> list[tuple[int, int]]:
    """Shapes of the states: h is state_width wide (the projection's P), the others hidden."""
    return [(batch, state_width if i == 0 else hidden) for i in range(num_states)]


def _contiguous_like(t: Tensor) -> Tensor:
    """A fake output shaped like t: the ops return contiguous gradients whatever the inputs' strides."""
    return t.new_empty(t.shape)


def _no_gradient(like: Tensor) -> Tensor:
    """What backward returns for an absent optional input (an op output must be a tensor)."""
    return like.new_empty((0,))


def forward_op(cell: str):
    return getattr(torch.ops.rnnattn, f"{cell}_forward").default


def backward_op(cell: str):
    return getattr(torch.ops.rnnattn, f"{cell}_backward").default


def attention_forward_op(cell: str):
    return getattr(torch.ops.rnnattn, f"{cell}_attn_forward").default


def attention_backward_op(cell: str):
    return getattr(torch.ops.rnnattn, f"{cell}_attn_backward").default


def _register(cell: str) -> None:
    """The base layer's ops: inputs (input, *states, w_ih, w_hh, b_ih, b_hh[, w_hr], lengths, reverse,
    training)."""
    _gates, num_states, planes = CELL_LAYOUTS[cell]
    projection = cell in PROJECTED_CELLS
    fwd_name = f"rnnattn::{cell}_forward"
    bwd_name = f"rnnattn::{cell}_backward"

    def unpack_weights(args):
        """(w_ih, w_hh, b_ih, b_hh, w_hr) and the arguments after them, from the forward's arguments
        after the states."""
        w_ih, w_hh, b_ih, b_hh = args[:4]
        w_hr = args[4] if projection else None
        return (w_ih, w_hh, b_ih, b_hh, w_hr), args[5 if projection else 4 :]

    def fake_forward(input, *args):
        states = args[:num_states]
        (_w_ih, w_hh, _b_ih, _b_hh, w_hr), (_lengths, _reverse, training) = unpack_weights(args[num_states:])
        steps, batch = input.shape[0], input.shape[1]
        hidden, width = _widths(cell, w_hh, w_hr)
        output = input.new_empty((steps, batch, width))
        finals = [s.new_empty(shape) for s, shape in zip(states, _state_shapes(batch, num_states, hidden, width))]
        used_planes = planes + (w_hr is not None)
        workspace = input.new_empty((steps, used_planes, batch, hidden) if training else (0,))
        return (output, *finals, workspace)

    def fake_backward(grad_output, *args):
        input = args[num_states]
        states = args[num_states + 1 : 2 * num_states + 1]
        weight_ih, weight_hh = args[2 * num_states + 1], args[2 * num_states + 2]
        grads = [
            _contiguous_like(input),
            *[_contiguous_like(s) for s in states],
            _contiguous_like(weight_ih),
            _contiguous_like(weight_hh),
            weight_hh.new_empty((weight_hh.shape[0],)),
            weight_hh.new_empty((weight_hh.shape[0],)),
        ]
        if projection:
            weight_hr = args[2 * num_states + 3]
            grads.append(_contiguous_like(weight_hr) if weight_hr is not None else _no_gradient(input))
        return tuple(grads)

    def setup_context(ctx, inputs, output):
        input = inputs[0]
        states = inputs[1 : 1 + num_states]
        (w_ih, w_hh, b_ih, b_hh, w_hr), (lengths, reverse, _training) = unpack_weights(inputs[1 + num_states :])
        out, workspace = output[0], output[-1]
        ctx.save_for_backward(input, *states, w_ih, w_hh, w_hr, out, workspace, lengths)
        ctx.reverse = reverse
        ctx.has_bias = (b_ih is not None, b_hh is not None)

    def backward(ctx, grad_output, *grads):
        grad_finals = grads[:num_states]  # the workspace's gradient (last) is ignored
        saved = ctx.saved_tensors
        input = saved[0]
        states = saved[1 : 1 + num_states]
        weight_ih, weight_hh, weight_hr, out, workspace, lengths = saved[1 + num_states :]
        grad_finals = [g if g is not None else torch.zeros_like(s) for g, s in zip(grad_finals, states)]
        if grad_output is None:
            grad_output = torch.zeros_like(out)
        projection_args = (weight_hr,) if projection else ()
        result = backward_op(cell)(
            grad_output, *grad_finals, input, *states, weight_ih, weight_hh, *projection_args, out, workspace,
            lengths, ctx.reverse
        )
        grad_input = result[0]
        grad_states = result[1 : 1 + num_states]
        grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh = result[1 + num_states : 5 + num_states]
        grad_projection = (result[-1] if weight_hr is not None else None,) if projection else ()
        return (
            grad_input,
            *grad_states,
            grad_w_ih,
            grad_w_hh,
            grad_b_ih if ctx.has_bias[0] else None,
            grad_b_hh if ctx.has_bias[1] else None,
            *grad_projection,
            None,
            None,
            None,
        )

    torch.library.register_fake(fwd_name)(fake_forward)
    torch.library.register_fake(bwd_name)(fake_backward)
    torch.library.register_autograd(fwd_name, backward, setup_context=setup_context)


def _register_attention(cell: str) -> None:
    """The attention-augmented cell's ops: inputs (input, *states, w_ih, w_hh, b_ih, b_hh[, w_hr], w_q,
    b_q, w_k, b_k, w_v, b_v, w_c, memory, memory_lengths, lengths, past_keys, past_values, num_heads,
    window, reverse, training, need_weights)."""
    _gates, num_states, planes = CELL_LAYOUTS[cell]
    projection = cell in PROJECTED_CELLS
    fwd_name = f"rnnattn::{cell}_attn_forward"
    bwd_name = f"rnnattn::{cell}_attn_backward"

    def unpack(inputs):
        """input, states, the 11 weights (w_ih .. w_c), weight_hr (or None) and the other arguments."""
        input, states, rest = inputs[0], inputs[1 : 1 + num_states], list(inputs[1 + num_states :])
        w_hr = rest.pop(4) if projection else None
        (w_ih, w_hh, b_ih, b_hh, w_q, b_q, w_k, b_k, w_v, b_v, w_c, memory, memory_lengths, lengths, past_keys,
         past_values, num_heads, window, reverse, training, need_weights) = rest
        return input, states, (w_ih, w_hh, b_ih, b_hh, w_q, b_q, w_k, b_k, w_v, b_v, w_c), w_hr, (
            memory, memory_lengths, lengths, past_keys, past_values, num_heads, window, reverse, training,
            need_weights)

    def fake_forward(*inputs):
        input, states, weights, w_hr, (memory, _mem_lengths, _lengths, past_keys, _past_values, num_heads, window,
                                       _reverse, training, need_weights) = unpack(inputs)
        steps, batch = input.shape[0], input.shape[1]
        (hidden, state_width), width = _widths(cell, weights[1], w_hr), weights[4].shape[0]
        past = 0 if past_keys is None else past_keys.shape[0]
        slots = past + steps if memory is None else memory.shape[0]
        weight_slots = slots if memory is not None or window is None else window
        used_planes = planes + (w_hr is not None)
        shapes = _state_shapes(batch, num_states, hidden, state_width)
        return (
            input.new_empty((steps, batch, state_width)),
            *[s.new_empty(shape) for s, shape in zip(states, shapes)],
            input.new_empty((steps, batch, width)),
            input.new_empty((steps, batch, num_heads, weight_slots) if need_weights else (0,)),
            input.new_empty((steps, used_planes, batch, hidden) if training else (0,)),
            input.new_empty(((steps + 2 * slots) * batch * width,) if training else (0,)),
        )

    def fake_backward(grad_output, *args):
        input = args[num_states + 1]
        states = args[num_states + 2 : 2 * num_states + 2]
        rest = list(args[2 * num_states + 2 :])
        w_hr = rest.pop(2) if projection else None
        w_ih, w_hh, w_q, w_k, w_v, w_c, memory = rest[:7]
        past_keys, past_values = rest[9:11]

        def vector(w):
            return w.new_empty((w.shape[0],))
        grads = [
            _contiguous_like(input),
            *[_contiguous_like(s) for s in states],
            _contiguous_like(w_ih), _contiguous_like(w_hh), vector(w_hh), vector(w_hh),
            _contiguous_like(w_q), vector(w_q), _contiguous_like(w_k), vector(w_k), _contiguous_like(w_v), vector(w_v),
            _contiguous_like(w_c),
            _contiguous_like(memory) if memory is not None else _no_gradient(input),
            *[_contiguous_like(p) if p is not None else _no_gradient(input) for p in (past_keys, past_values)],
        ]
        if projection:
            grads.append(_contiguous_like(w_hr) if w_hr is not None else _no_gradient(input))
        return tuple(grads)

    def setup_context(ctx, inputs, output):
        input, states, weights, w_hr, (memory, memory_lengths, lengths, past_keys, past_values, num_heads, window,
                                       reverse, _training, _need) = unpack(inputs)
        w_ih, w_hh, b_ih, b_hh, w_q, b_q, w_k, b_k, w_v, b_v, w_c = weights
        out, context, workspace, attention_workspace = output[0], output[1 + num_states], output[-2], output[-1]
        ctx.save_for_backward(input, *states, w_ih, w_hh, w_hr, w_q, w_k, w_v, w_c, memory, memory_lengths, lengths,
                              past_keys, past_values, out, context, workspace, attention_workspace)
        # The attention weights are for inspection: they carry no gradient (the context does).
        ctx.mark_non_differentiable(output[2 + num_states], workspace, attention_workspace)
        ctx.options = (num_heads, window, reverse)
        ctx.has_bias = tuple(b is not None for b in (b_ih, b_hh, b_q, b_k, b_v))

    def backward(ctx, grad_output, *grads):
        grad_finals = grads[:num_states]
        grad_context = grads[num_states]  # the attention weights, workspaces: not differentiable
        saved = ctx.saved_tensors
        input, states = saved[0], saved[1 : 1 + num_states]
        (w_ih, w_hh, w_hr, w_q, w_k, w_v, w_c, memory, memory_lengths, lengths, past_keys, past_values, out, context,
         workspace, attention_workspace) = saved[1 + num_states :]
        grad_finals = [g if g is not None else torch.zeros_like(s) for g, s in zip(grad_finals, states)]
        if grad_output is None:
            grad_output = torch.zeros_like(out)
        num_heads, window, reverse = ctx.options
        projection_args = (w_hr,) if projection else ()
        result = attention_backward_op(cell)(
            grad_output, *grad_finals, grad_context, input, *states, w_ih, w_hh, *projection_args, w_q, w_k, w_v, w_c,
            memory, memory_lengths, lengths, past_keys, past_values, out, context, workspace, attention_workspace,
            num_heads, window, reverse,
        )
        grad_input, grad_states = result[0], result[1 : 1 + num_states]
        (g_w_ih, g_w_hh, g_b_ih, g_b_hh, g_w_q, g_b_q, g_w_k, g_b_k, g_w_v, g_b_v, g_w_c, g_memory, g_past_keys,
         g_past_values) = result[1 + num_states : 15 + num_states]
        grad_projection = (result[-1] if w_hr is not None else None,) if projection else ()
        has = ctx.has_bias
        return (
            grad_input, *grad_states,
            g_w_ih, g_w_hh, g_b_ih if has[0] else None, g_b_hh if has[1] else None, *grad_projection,
            g_w_q, g_b_q if has[2] else None, g_w_k, g_b_k if has[3] else None, g_w_v, g_b_v if has[4] else None,
            g_w_c, g_memory if memory is not None else None,
            None, None,
            g_past_keys if past_keys is not None else None, g_past_values if past_values is not None else None,
            None, None, None, None, None,
        )

    torch.library.register_fake(fwd_name)(fake_forward)
    torch.library.register_fake(bwd_name)(fake_backward)
    torch.library.register_autograd(fwd_name, backward, setup_context=setup_context)


for _cell in CELLS:
    _register(_cell)
    _register_attention(_cell)

