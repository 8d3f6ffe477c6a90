"""The forward ops as plain torch operations, where our ops cannot serve: the ONNX export
(``onnx_export``) decomposes what ONNX has no operator for (the attention-augmented cells, the LSTM
projection) into these, and ``functional`` runs them in forward mode (the ops have reverse-mode
gradients only; torch differentiates these either way). One step function holds the cell, the
attention and the lengths; a static number of steps runs it in an unrolled Python loop, a symbolic
one in torch's ``scan`` (ONNX's Scan operator), so exports keep a dynamic time dimension. The self
memory is a fixed-width window of slots shifted each step (the window, or every slot when
unbounded); lengths and external memory are masks. Same results as the ops to rounding
(tests/test_onnx.py compares them).

``reference`` computes the same layers, but as the SPEC's oracle: written for reading, with
in-place writes and reshapes that neither a scan body nor ONNX can hold, so the two stay apart and
share only the cell update and the projection.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._higher_order_ops.scan import scan

from . import _ops
from .reference import cell_update, project


def _required(weight: Tensor | None) -> Tensor:
    if weight is None:
        raise TypeError("rnnattn_ext.unrolled: the attention weights w_q, w_k, w_v and w_c are required, got None")
    return weight


def _attend(query: Tensor, keys: Tensor, values: Tensor, valid: Tensor, num_heads: int) -> tuple[Tensor, Tensor]:
    """Multi-head scaled dot-product attention of one step: query (B, D) over keys and values (B, S, D)
    where valid (B, S); a row without a valid slot gets zero weights and a zero context. Returns the
    context (B, D) and the weights (B, heads, S)."""
    # Head by head, with slices, products and sums only: no reshape, whose sizes in a scan body would
    # carry a symbolic batch or slot count, which the ONNX translation of scan does not take.
    head_dim = keys.shape[-1] // num_heads
    mask = valid.any(dim=-1, keepdim=True)
    contexts, weights = [], []
    for head in range(num_heads):
        part = slice(head * head_dim, (head + 1) * head_dim)
        scores = (query[:, None, part] * keys[:, :, part]).sum(-1) * head_dim ** -0.5  # (B, S)
        w = torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=-1)
        w = torch.where(mask, w, 0.0)
        contexts.append((w.unsqueeze(-1) * values[:, :, part]).sum(1))
        weights.append(w)
    return torch.cat(contexts, dim=-1), torch.stack(weights, dim=1)


def _slots(past: Tensor | None, kept: int, batch: int, count, width: int, like: Tensor) -> Tensor:
    """(B, count, width) slots: zeros, then the last `kept` of the past slots (P, B, width) at the end."""
    empty = like.new_zeros((batch, count, width))
    if past is None or kept == 0:
        return empty
    return torch.cat([empty[:, : count - kept], past[past.shape[0] - kept :].transpose(0, 1)], dim=1)


def attention_forward(cell: str, input: Tensor, states: Sequence[Tensor], weight_ih: Tensor, weight_hh: Tensor,
                      bias_ih: Tensor | None, bias_hh: Tensor | None, weight_hr: Tensor | None,
                      attention: Sequence[Tensor | None] | None, memory: Tensor | None = None,
                      memory_lengths: Tensor | None = None, lengths: Tensor | None = None,
                      past_keys: Tensor | None = None, past_values: Tensor | None = None, num_heads: int = 1,
                      window: int | None = None, reverse: bool = False, need_weights: bool = False,
                      in_scan: bool | None = None) -> tuple[Tensor, list[Tensor], Tensor | None, Tensor | None]:
    """One layer and direction, as ``<cell>_attn_forward`` (``attention`` = (w_q, b_q, w_k, b_k, w_v,
    b_v, w_c)) or, with ``attention`` None, as ``<cell>_forward``. Returns the output, the final
    states, and the context and attention weights (None without attention; weights None unless
    asked for). The steps run in torch's scan when ``in_scan`` (default: when their number is
    symbolic), else in a Python loop."""
    steps, batch = input.shape[0], input.shape[1]
    x_terms = F.linear(input, weight_ih, bias_ih)  # every step's input product at once
    self_memory = attention is not None and memory is None
    # The self memory's slots, oldest first, and the rows each is valid for: the carry's second part.
    slots: tuple[Tensor, ...] = ()
    if attention is not None:
        w_q, w_k, w_v, w_c = (_required(attention[i]) for i in (0, 2, 4, 6))
        b_q, b_k, b_v = attention[1], attention[3], attention[5]
        width = w_q.shape[0]
        if memory is not None:
            # External memory: every key and value once; slots past a row's memory length are masked.
            memory_keys = F.linear(memory, w_k, b_k).transpose(0, 1)  # (B, S, D)
            memory_values = F.linear(memory, w_v, b_v).transpose(0, 1)
            positions = torch.arange(memory.shape[0], device=input.device)
            limit = memory_lengths if memory_lengths is not None else torch.full_like(positions[:1], memory.shape[0])
            memory_valid = positions.unsqueeze(0) < limit.unsqueeze(1)  # (B, S)
        else:
            # The window, or (unbounded) every past and new slot: the weights' width either way.
            past = 0 if past_keys is None else past_keys.shape[0]
            count = window if window is not None else past + steps
            kept = past if window is None else min(past, window)
            # Validity as 0/1 in the input's dtype: scan differentiates its carry, which a bool cannot be.
            valid = (torch.arange(count, device=input.device) >= count - kept).to(input.dtype).repeat(batch, 1)
            slots = (_slots(past_keys, kept, batch, count, width, input),
                     _slots(past_values, kept, batch, count, width, input), valid)
    all_rows = torch.ones(batch, dtype=torch.bool, device=input.device)

    def step(carry, per_step):
        states, slots = carry
        x_term, t = per_step
        h_prev = states[0]
        # Rows past their length are held: no update, no valid slot, zero output and context (SPEC).
        active = (t < lengths) if lengths is not None else None
        results = []
        if attention is not None:
            if self_memory:
                keys, values, valid = slots
                keys = torch.cat([keys[:, 1:], F.linear(h_prev, w_k, b_k).unsqueeze(1)], dim=1)
                values = torch.cat([values[:, 1:], F.linear(h_prev, w_v, b_v).unsqueeze(1)], dim=1)
                new_valid = (active if active is not None else all_rows).to(valid.dtype).unsqueeze(1)
                valid = torch.cat([valid[:, 1:], new_valid], dim=1)
                slots = (keys, values, valid)
                valid = valid > 0
            else:
                keys, values, valid = memory_keys, memory_values, memory_valid
            if active is not None:
                valid = valid & active.unsqueeze(1)
            context, weights = _attend(F.linear(h_prev, w_q, b_q), keys, values, valid, num_heads)
            x_term = x_term + F.linear(context, w_c)
            results.append(context)
            if need_weights:
                results.append(weights)
        new_states = project(cell_update(cell, x_term, F.linear(h_prev, weight_hh, bias_hh), states), weight_hr)
        if active is not None:
            keep = active.unsqueeze(1)
            new_states = [torch.where(keep, new, old) for new, old in zip(new_states, states)]
            output = torch.where(keep, new_states[0], 0.0)
        else:
            output = new_states[0]
        return (new_states, slots), [output, *results]

    carry = (list(states), slots)
    if in_scan if in_scan is not None else not isinstance(steps, int):
        def scan_step(carry, per_step):  # scan's outputs may not alias its carry
            carry, results = step(carry, per_step)
            return carry, [r.clone() for r in results]

        positions = torch.arange(steps, device=input.device)
        # scan traces its body with Dynamo, whose automatic dynamic shapes would turn sizes seen before
        # with other values into symbolic inputs of the body, which ONNX's Scan cannot take.
        with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
            carry, stacked = scan(scan_step, carry, (x_terms, positions), reverse=reverse)
    else:
        per_step_results = []
        for t in (range(steps - 1, -1, -1) if reverse else range(steps)):
            carry, results = step(carry, (x_terms[t], t))
            per_step_results.append(results)
        if reverse:
            per_step_results.reverse()
        stacked = [torch.stack(r) for r in zip(*per_step_results)]
    finals = list(carry[0])
    if not stacked:  # no step ran: empty outputs of the ops' shapes
        stacked = [input.new_zeros((0, batch, finals[0].shape[1]))]
        if attention is not None:
            stacked.append(input.new_zeros((0, batch, width)))
            weight_slots = memory.shape[0] if memory is not None else slots[0].shape[1]
            stacked.append(input.new_zeros((0, batch, num_heads, weight_slots)))
    if attention is None:
        return stacked[0], finals, None, None
    return stacked[0], finals, stacked[1], stacked[2] if need_weights else None


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


def base_op(cell: str, in_scan: bool | None = None):
    """``<cell>_forward`` as plain torch operations (its outputs, the workspace empty: only backward
    reads it); ``in_scan`` as for ``attention_forward``."""

    def run(*args):
        input, states, w_ih, w_hh, b_ih, b_hh, w_hr, (lengths, reverse, _training) = _split_op_arguments(cell, args)
        output, finals, _, _ = attention_forward(cell, input, states, w_ih, w_hh, b_ih, b_hh, w_hr, None,
                                                 lengths=lengths, reverse=reverse, in_scan=in_scan)
        return (output, *finals, input.new_empty((0,), dtype=_ops.workspace_dtype(input)))

    return run


def attention_op(cell: str, in_scan: bool | None = None):
    """``<cell>_attn_forward`` as plain torch operations (its outputs; the workspaces empty: only
    backward reads them); ``in_scan`` as for ``attention_forward``."""

    def run(*args):
        input, states, w_ih, w_hh, b_ih, b_hh, w_hr, rest = _split_op_arguments(cell, args)
        (*attention, memory, memory_lengths, lengths, past_keys, past_values, num_heads, window, reverse,
         _training, need_weights) = rest
        output, finals, context, weights = attention_forward(
            cell, input, states, w_ih, w_hh, b_ih, b_hh, w_hr, attention, memory, memory_lengths, lengths,
            past_keys, past_values, num_heads, window, reverse, need_weights, in_scan)
        empty = input.new_empty((0,))
        return (output, *finals, context, weights if weights is not None else empty, empty, empty)

    return run
