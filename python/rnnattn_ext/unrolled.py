"""The forward ops as plain torch operations over a fixed number of steps, for exporters that cannot
hold our ops: the ONNX export (``onnx_export``) decomposes what ONNX has no operator for (the
attention-augmented cells, the LSTM projection) into these. The time loop is unrolled, so the number
of steps must be static; lengths, windows, external memory and streamed past slots are masks over
that loop, traced as tensors. Same results as the ops to rounding (tests/test_onnx.py compares them).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _ops
from .reference import cell_update, project


class StepsNotStatic(ValueError):
    """The number of steps is symbolic: an unrolled loop needs it fixed."""


def _static_steps(input: Tensor, what: str) -> int:
    steps = input.shape[0]
    if not isinstance(steps, int):
        raise StepsNotStatic(f"{what} runs as an unrolled loop that needs a static number of steps; the input's "
                             f"first (time) dimension came symbolic ({steps}): export without a dynamic time "
                             "dimension (for example one step per call, streaming)")
    return steps


def _required(weight: Tensor | None) -> Tensor:
    if weight is None:
        raise TypeError("rnnattn_ext.unrolled: the attention weights w_q, w_k, w_v and w_c are required, got None")
    return weight


def _attend(query: Tensor, keys: Tensor, values: Tensor, valid: Tensor, num_heads: int) -> tuple[Tensor, Tensor]:
    """Multi-head scaled dot-product attention of one step: query (B, D) over keys and values (B, S, D)
    where valid (B, S); a row without a valid slot gets zero weights and a zero context. Returns the
    context (B, D) and the weights (B, heads, S)."""
    batch, slots, width = keys.shape
    head_dim = width // num_heads
    q = query.reshape(batch, num_heads, 1, head_dim)
    k = keys.reshape(batch, slots, num_heads, head_dim).permute(0, 2, 3, 1)  # (B, heads, hd, S)
    v = values.reshape(batch, slots, num_heads, head_dim).transpose(1, 2)    # (B, heads, S, hd)
    scores = (q @ k).squeeze(2) * head_dim ** -0.5                            # (B, heads, S)
    mask = valid.unsqueeze(1)
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    weights = torch.where(mask.any(dim=-1, keepdim=True), weights, torch.zeros_like(weights))
    context = (weights.unsqueeze(2) @ v).reshape(batch, width)
    return context, weights


def attention_forward(cell: str, input: Tensor, states: Sequence[Tensor], weight_ih: Tensor, weight_hh: Tensor,
                      bias_ih: Tensor | None, bias_hh: Tensor | None, weight_hr: Tensor | None,
                      attention: Sequence[Tensor | None] | None, memory: Tensor | None = None,
                      memory_lengths: Tensor | None = None, lengths: Tensor | None = None,
                      past_keys: Tensor | None = None, past_values: Tensor | None = None, num_heads: int = 1,
                      window: int | None = None, reverse: bool = False,
                      need_weights: bool = False) -> tuple[Tensor, list[Tensor], Tensor | None, Tensor | None]:
    """One layer and direction, as ``<cell>_attn_forward`` (``attention`` = (w_q, b_q, w_k, b_k, w_v,
    b_v, w_c)) or, with ``attention`` None, as ``<cell>_forward``. Returns the output, the final
    states, and the context and attention weights (None without attention; weights None unless
    asked for)."""
    steps = _static_steps(input, f"rnnattn::{cell}_{'attn_' if attention is not None else ''}forward")
    batch = input.shape[1]
    states = list(states)
    # Per step, in the order the loop runs (reversed at the end for the reverse direction).
    outputs: list[Tensor] = []
    contexts: list[Tensor] = []
    step_weights: list[Tensor] = []
    if attention is not None:
        w_q, w_k, w_v, w_c = (_required(attention[i]) for i in (0, 2, 4, 6))
        b_q, b_k, b_v = attention[1], attention[3], attention[5]
        if memory is not None:
            # External memory: every key and value once; slots past a row's memory length are masked.
            keys = F.linear(memory, w_k, b_k).transpose(0, 1)  # (B, S, D)
            values = F.linear(memory, w_v, b_v).transpose(0, 1)
            positions = torch.arange(memory.shape[0], device=input.device)
            limit = memory_lengths if memory_lengths is not None else torch.full_like(positions[:1], memory.shape[0])
            memory_valid = positions.unsqueeze(0) < limit.unsqueeze(1)  # (B, S)
            weight_slots = memory.shape[0]
        else:
            # Self memory: the slots in step order (past ones first), each with the rows it is valid for.
            slot_keys: list[Tensor] = [] if past_keys is None else list(past_keys.unbind(0))
            slot_values: list[Tensor] = [] if past_values is None else list(past_values.unbind(0))
            all_rows = torch.ones(batch, dtype=torch.bool, device=input.device)
            slot_valid: list[Tensor] = [all_rows] * len(slot_keys)
            weight_slots = window if window is not None else len(slot_keys) + steps
    order = range(steps - 1, -1, -1) if reverse else range(steps)
    for t in order:
        h_prev = states[0]
        # Rows past their length are held: no update, no slot, zero output and context (SPEC).
        active = (t < lengths) if lengths is not None else None
        x_term = F.linear(input[t], weight_ih, bias_ih)
        if attention is not None:
            if memory is None:
                slot_keys.append(F.linear(h_prev, w_k, b_k))
                slot_values.append(F.linear(h_prev, w_v, b_v))
                slot_valid.append(active if active is not None else all_rows)
                first = 0 if window is None else max(0, len(slot_keys) - window)
                keys, values = torch.stack(slot_keys[first:], dim=1), torch.stack(slot_values[first:], dim=1)
                valid = torch.stack(slot_valid[first:], dim=1)
            else:
                valid = memory_valid
            if active is not None:
                valid = valid & active.unsqueeze(1)
            context, weights = _attend(F.linear(h_prev, w_q, b_q), keys, values, valid, num_heads)
            x_term = x_term + F.linear(context, w_c)
            contexts.append(context)
            if need_weights:
                # Self memory: the most recent slot last of weight_slots; external: slot s at s.
                pad = weight_slots - weights.shape[-1]
                step_weights.append(F.pad(weights, (pad, 0) if memory is None else (0, pad)))
        new_states = project(cell_update(cell, x_term, F.linear(h_prev, weight_hh, bias_hh), states), weight_hr)
        if active is not None:
            keep = active.unsqueeze(1)
            new_states = [torch.where(keep, new, old) for new, old in zip(new_states, states)]
            outputs.append(torch.where(keep, new_states[0], torch.zeros_like(new_states[0])))
        else:
            outputs.append(new_states[0])
        states = new_states

    def in_time_order(per_step: list[Tensor], empty_shape: tuple) -> Tensor:
        if not per_step:
            return input.new_zeros(empty_shape)
        return torch.stack(per_step[::-1] if reverse else per_step)

    output = in_time_order(outputs, (0, batch, weight_hh.shape[1]))
    if attention is None:
        return output, states, None, None
    context_out = in_time_order(contexts, (0, batch, _required(attention[0]).shape[0]))
    weights_out = in_time_order(step_weights, (0, batch, num_heads, weight_slots)) if need_weights else None
    return output, states, context_out, weights_out


def _split_op_arguments(cell: str, args: tuple):
    """(input, states, w_ih, w_hh, b_ih, b_hh, w_hr, rest) from an op's positional arguments."""
    num_states = _ops.CELL_LAYOUTS[cell][1]
    input, states = args[0], list(args[1 : 1 + num_states])
    w_ih, w_hh, b_ih, b_hh = args[1 + num_states : 5 + num_states]
    i = 5 + num_states
    w_hr = None
    if cell in _ops.PROJECTED_CELLS:
        w_hr, i = args[i], i + 1
    return input, states, w_ih, w_hh, b_ih, b_hh, w_hr, args[i:]


def op_weight_hr(cell: str, args: tuple) -> Tensor | None:
    """The projection weight among a forward op's positional arguments (None: none)."""
    return _split_op_arguments(cell, args)[6]


def base_op(cell: str):
    """``<cell>_forward`` unrolled (its outputs, the workspace empty: only backward reads it)."""

    def run(*args):
        input, states, w_ih, w_hh, b_ih, b_hh, w_hr, (lengths, reverse, _training) = _split_op_arguments(cell, args)
        output, finals, _, _ = attention_forward(cell, input, states, w_ih, w_hh, b_ih, b_hh, w_hr, None,
                                                 lengths=lengths, reverse=reverse)
        return (output, *finals, input.new_empty((0,)))

    return run


def attention_op(cell: str):
    """``<cell>_attn_forward`` unrolled (its outputs; the workspaces empty: only backward reads them)."""

    def run(*args):
        input, states, w_ih, w_hh, b_ih, b_hh, w_hr, rest = _split_op_arguments(cell, args)
        (*attention, memory, memory_lengths, lengths, past_keys, past_values, num_heads, window, reverse,
         _training, need_weights) = rest
        output, finals, context, weights = attention_forward(
            cell, input, states, w_ih, w_hh, b_ih, b_hh, w_hr, attention, memory, memory_lengths, lengths,
            past_keys, past_values, num_heads, window, reverse, need_weights)
        empty = input.new_empty((0,))
        return (output, *finals, context, weights if weights is not None else empty, empty, empty)

    return run
