"""Fake (meta) implementations of the torch.ops.rnnattn operators, and the handles the Python side calls
them through.

The schemas live in csrc/ops/schemas.cpp, the CPU and CUDA kernels and the autograd of every op
(csrc/ops/autograd_ops.cpp: a forward op's backward is its registered ``*_backward`` op) in csrc, so
torch.compile and torch.export see no Python-only code, and a call costs no Python beyond its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Literal, overload

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


def workspace_dtype(input: Tensor) -> torch.dtype:
    """The dtype of a base forward op's workspace (C++ ``workspace_dtype``): float32 for a float16 or
    bfloat16 input on the CPU, whose loop computes in float32, else the input's."""
    if input.device.type == "cpu" and input.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return input.dtype


def _contiguous_like(t: Tensor) -> Tensor:
    """A fake output shaped like t: the ops return contiguous gradients whatever the inputs' strides."""
    return t.new_empty(t.shape)


def _no_gradient(like: Tensor) -> Tensor:
    """What backward returns for an absent optional input (an op output must be a tensor)."""
    return like.new_empty((0,))


# The op handles, looked up once: a one-step call is bound by such Python steps.
_OP_HANDLES = {name: getattr(torch.ops.rnnattn, name).default
               for cell in CELLS for name in (f"{cell}_forward", f"{cell}_backward", f"{cell}_attn_forward",
                                              f"{cell}_attn_backward")}


def forward_op(cell: str):
    return _OP_HANDLES[f"{cell}_forward"]


def backward_op(cell: str):
    return _OP_HANDLES[f"{cell}_backward"]


def attention_forward_op(cell: str):
    return _OP_HANDLES[f"{cell}_attn_forward"]


def attention_backward_op(cell: str):
    return _OP_HANDLES[f"{cell}_attn_backward"]


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
        workspace = input.new_empty((steps, used_planes, batch, hidden) if training else (0,),
                                    dtype=workspace_dtype(input))
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

    torch.library.register_fake(fwd_name)(fake_forward)
    torch.library.register_fake(bwd_name)(fake_backward)


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

    torch.library.register_fake(fwd_name)(fake_forward)
    torch.library.register_fake(bwd_name)(fake_backward)


for _cell in CELLS:
    _register(_cell)
    _register_attention(_cell)

#: The modules' call through a cell's forward op, layer by layer, without Python around it:
#: (output, [finals]) or None for a call the general path must take (csrc/python_layer_call.cpp).
run_layers = _C.run_layers
#: The attention modules' call, likewise: (output, [finals], keys, values) or None.
run_attention_layers = _C.run_attention_layers
#: HybridBlock's attention for a short chunk or sequence in C++: (output, keys, values) or None where
#: its torch operations must take it (csrc/python_hybrid_attention.cpp).
hybrid_stream_attention = _C.hybrid_stream_attention

if TYPE_CHECKING:

    class Streamer:
        """What type checkers see of ``_C.Streamer`` (csrc/python_streamer.cpp, documented there)."""

        num_layers: int
        input_size: int

        def __init__(self, cell: str, layers: list[tuple[Tensor | None, ...]], input_size: int, widths: list[int],
                     num_heads: int = 0, window: int | None = None, memory: Tensor | None = None,
                     memory_lengths: Tensor | None = None,
                     prepare_memory: Callable[[Any, Any], tuple[Tensor, Tensor | None]] | None = None) -> None: ...
        @overload
        def step(self, input: Tensor, need_weights: Literal[False] = False) -> Tensor: ...
        @overload
        def step(self, input: Tensor, need_weights: Literal[True]) -> tuple[Tensor, list[Tensor]]: ...
        def step(self, input: Tensor, need_weights: bool = False) -> Any: ...
        @property
        def state(self) -> Any: ...  # as the module's stream returns it, or None
        def reset(self, state: Any = None, memory: Tensor | None = None, memory_lengths: Any = None) -> None: ...

    class HybridAttentionStep:
        """What type checkers see of ``_C.HybridAttentionStep`` (csrc/python_hybrid_attention.cpp)."""

        def __init__(self, qkv_weight: Tensor, qkv_bias: Tensor | None, out_weight: Tensor, out_bias: Tensor | None,
                     num_heads: int, head_dim: int) -> None: ...
        def step(self, y: Tensor, keys: Tensor, values: Tensor, first: int, count: int) -> Tensor: ...

else:
    #: Streaming inference one step per call, the state kept inside (csrc/python_streamer.cpp); made
    #: by RecurrentBase.streamer.
    Streamer = _C.Streamer
    #: HybridStreamer's attention step for a float32 block on the CPU (csrc/python_hybrid_attention.cpp).
    HybridAttentionStep = _C.HybridAttentionStep
