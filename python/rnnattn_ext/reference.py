"""Plain PyTorch time-loop implementations: the test oracle for every op and module.

Written for clarity, not speed; each cell follows SPEC.md line by line.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    y = x @ weight.t()
    return y if bias is None else y + bias


def cell_update(cell: str, x_term: Tensor, h_term: Tensor, states: Sequence[Tensor]) -> list[Tensor]:
    """One step of a base cell from its two pre-activations: x_term = W_ih x + b_ih (plus, in the
    attention cell, W_c ctx), h_term = W_hh h + b_hh. Returns the new states ([h, c] or [h])."""
    if cell == "lstm":
        i, f, g, o = (x_term + h_term).chunk(4, dim=-1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c_next = f * states[1] + i * g
        return [o * torch.tanh(c_next), c_next]
    if cell == "gru":
        xr, xz, xn = x_term.chunk(3, dim=-1)
        hr, hz, hn = h_term.chunk(3, dim=-1)
        r = torch.sigmoid(xr + hr)
        z = torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return [(1 - z) * n + z * states[0]]
    if cell == "rnn_tanh":
        return [torch.tanh(x_term + h_term)]
    if cell == "rnn_relu":
        return [torch.relu(x_term + h_term)]
    raise ValueError(f"unknown cell {cell!r}")


def lstm_cell(x, h, c, w_ih, w_hh, b_ih=None, b_hh=None):
    return tuple(cell_update("lstm", _linear(x, w_ih, b_ih), _linear(h, w_hh, b_hh), [h, c]))


def gru_cell(x, h, w_ih, w_hh, b_ih=None, b_hh=None):
    return cell_update("gru", _linear(x, w_ih, b_ih), _linear(h, w_hh, b_hh), [h])[0]


def rnn_cell(x, h, w_ih, w_hh, b_ih=None, b_hh=None, nonlinearity="tanh"):
    return cell_update(f"rnn_{nonlinearity}", _linear(x, w_ih, b_ih), _linear(h, w_hh, b_hh), [h])[0]


def _step(cell: str, x, states, weights):
    w_ih, w_hh, b_ih, b_hh = weights
    return cell_update(cell, _linear(x, w_ih, b_ih), _linear(states[0], w_hh, b_hh), states)


def project(states: list[Tensor], weight_hr: Tensor | None) -> list[Tensor]:
    """LSTM with projection (SPEC): the new h is W_hr h'."""
    return states if weight_hr is None else [states[0] @ weight_hr.t(), *states[1:]]


def _each_row_alone(run_row, steps: int, lengths: Tensor):
    """Variable lengths the obvious way (SPEC "Variable lengths"): row b runs alone over its first
    lengths[b] steps; its time-major results are padded with zeros to ``steps`` and the rows joined.
    run_row(b, length) returns (output, final_states, *more time-major tensors)."""
    results = [run_row(b, int(length)) for b, length in enumerate(lengths.tolist())]

    def pad_time(t: Tensor) -> Tensor:
        return torch.cat([t, t.new_zeros((steps - t.shape[0], *t.shape[1:]))], dim=0)

    output = torch.cat([pad_time(r[0]) for r in results], dim=1)
    finals = [torch.cat([r[1][i] for r in results], dim=0) for i in range(len(results[0][1]))]
    more = [torch.cat([pad_time(r[2 + i]) for r in results], dim=1) for i in range(len(results[0]) - 2)]
    return output, finals, *more


def layer(
    cell: str,
    input: Tensor,
    states: Sequence[Tensor],
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Tensor | None = None,
    bias_hh: Tensor | None = None,
    reverse: bool = False,
    lengths: Tensor | None = None,
    weight_hr: Tensor | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """One layer, one direction, time-major: the reference of ``functional.layer``."""
    if lengths is not None:
        return _each_row_alone(
            lambda b, n: layer(cell, input[:n, b : b + 1], [s[b : b + 1] for s in states], weight_ih, weight_hh,
                               bias_ih, bias_hh, reverse, weight_hr=weight_hr),
            input.shape[0], lengths)
    states = list(states)
    steps = range(input.shape[0] - 1, -1, -1) if reverse else range(input.shape[0])
    outputs: list[Tensor] = []  # in step order
    for t in steps:
        states = project(_step(cell, input[t], states, (weight_ih, weight_hh, bias_ih, bias_hh)), weight_hr)
        outputs.append(states[0])
    if reverse:
        outputs.reverse()
    if outputs:
        output = torch.stack(outputs, dim=0)
    else:
        output = input.new_zeros((0, input.shape[1], weight_hh.shape[1]))
    return output, states


def stack(cell, input, states, weights, num_layers, bidirectional, lengths=None):
    """Reference of ``functional.stack`` (no dropout): weights[layer * D + direction] is
    (w_ih, w_hh, b_ih, b_hh[, w_hr])."""
    directions = 2 if bidirectional else 1
    finals = [[] for _ in states]
    x = input
    for layer_index in range(num_layers):
        outputs = []
        for direction in range(directions):
            index = layer_index * directions + direction
            w_ih, w_hh, b_ih, b_hh, *w_hr = weights[index]
            y, last = layer(cell, x, [s[index] for s in states], w_ih, w_hh, b_ih, b_hh, reverse=direction == 1,
                            lengths=lengths, weight_hr=w_hr[0] if w_hr else None)
            outputs.append(y)
            for collected, state in zip(finals, last):
                collected.append(state)
        x = torch.cat(outputs, dim=2)
    return x, [torch.stack(c, dim=0) for c in finals]


def attention_layer(
    cell: str,
    input: Tensor,
    states: Sequence[Tensor],
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Tensor | None,
    bias_hh: Tensor | None,
    weight_q: Tensor,
    bias_q: Tensor | None,
    weight_k: Tensor,
    bias_k: Tensor | None,
    weight_v: Tensor,
    bias_v: Tensor | None,
    weight_c: Tensor,
    num_heads: int,
    window: int | None = None,
    memory: Tensor | None = None,
    memory_lengths: Tensor | None = None,
    reverse: bool = False,
    lengths: Tensor | None = None,
    weight_hr: Tensor | None = None,
):
    """The attention-augmented cell of SPEC.md over one layer and direction, time-major.

    Self memory (``memory`` None): step t attends over the ``window`` most recent states
    h_{t-w} .. h_{t-1} (all past states if window is None; h_0 is the initial state). External
    memory: ``memory`` (S, B, E), rows at positions >= ``memory_lengths[b]`` ignored.

    Returns ``(output, final_states, context, attention)``: context (T, B, D); attention
    (T, B, num_heads, w) for self memory, slot w-1 holding the most recent state and zeros in
    slots that do not exist yet (w = T when window is None); for external memory
    (T, B, num_heads, S), zeros at padded positions.
    """
    steps, batch = input.shape[0], input.shape[1]
    if lengths is not None:
        def run_row(b: int, n: int):
            row_memory = None if memory is None else memory[:, b : b + 1]
            row_memory_lengths = None if memory_lengths is None else memory_lengths[b : b + 1]
            out, finals, context, attention = attention_layer(
                cell, input[:n, b : b + 1], [s[b : b + 1] for s in states], weight_ih, weight_hh, bias_ih, bias_hh,
                weight_q, bias_q, weight_k, bias_k, weight_v, bias_v, weight_c, num_heads, window, row_memory,
                row_memory_lengths, reverse, weight_hr=weight_hr)
            if memory is None and window is None:  # n slots of the row's own; the most recent last of T
                attention = torch.cat([attention.new_zeros((*attention.shape[:3], steps - n)), attention], dim=3)
            return out, finals, context, attention

        return _each_row_alone(run_row, steps, lengths)
    width = weight_q.shape[0]
    if width % num_heads != 0:
        raise ValueError(f"num_heads ({num_heads}) must divide the attention width D = {width}")
    head_dim = width // num_heads
    scale = head_dim ** -0.5
    states = list(states)
    order = range(steps - 1, -1, -1) if reverse else range(steps)
    outputs: list[Tensor] = []  # in step order
    contexts: list[Tensor] = []
    if memory is not None:
        slots = memory.shape[0]
    else:
        slots = window if window is not None else steps
    attention = input.new_zeros((steps, batch, num_heads, slots))

    def split(t: Tensor) -> Tensor:  # (..., D) -> (..., heads, head_dim)
        return t.reshape(*t.shape[:-1], num_heads, head_dim)

    if memory is not None:
        keys = split(_linear(memory, weight_k, bias_k)).permute(1, 0, 2, 3)  # (B, S, heads, hd)
        values = split(_linear(memory, weight_v, bias_v)).permute(1, 0, 2, 3)
        positions = torch.arange(memory.shape[0], device=memory.device)
        lengths = memory_lengths if memory_lengths is not None else torch.full(
            (batch,), memory.shape[0], device=memory.device)
        valid = positions.unsqueeze(0) < lengths.unsqueeze(1)  # (B, S)
    else:
        past_keys: list[Tensor] = []  # each slot's key and value, computed once
        past_values: list[Tensor] = []

    for t in order:
        h_prev = states[0]
        if memory is None:
            past_keys.append(split(_linear(h_prev, weight_k, bias_k)))
            past_values.append(split(_linear(h_prev, weight_v, bias_v)))
            first = 0 if window is None else max(0, len(past_keys) - window)
            keys = torch.stack(past_keys[first:], dim=1)  # (B, S_t, heads, hd)
            values = torch.stack(past_values[first:], dim=1)
        query = split(_linear(h_prev, weight_q, bias_q))  # (B, heads, hd)
        scores = torch.einsum("bhd,bshd->bhs", query, keys) * scale
        if memory is not None:
            scores = scores.masked_fill(~valid.unsqueeze(1), float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        context = torch.einsum("bhs,bshd->bhd", weights, values).reshape(batch, width)
        attention[t, :, :, slots - weights.shape[-1]:] = weights
        x_term = _linear(input[t], weight_ih, bias_ih) + context @ weight_c.t()
        states = project(cell_update(cell, x_term, _linear(h_prev, weight_hh, bias_hh), states), weight_hr)
        outputs.append(states[0])
        contexts.append(context)
    if reverse:
        outputs.reverse()
        contexts.reverse()
    if steps:
        output, context_out = torch.stack(outputs), torch.stack(contexts)
    else:
        output = input.new_zeros((0, batch, weight_hh.shape[1]))
        context_out = input.new_zeros((0, batch, width))
    return output, states, context_out, attention


def attention_stack(cell, input, states, weights, num_layers, bidirectional, num_heads, window=None, memory=None,
                    memory_lengths=None, lengths=None):
    """Reference of ``functional.attention_stack`` (no dropout): weights[layer * D + direction] is
    (w_ih, w_hh, b_ih, b_hh, w_q, b_q, w_k, b_k, w_v, b_v, w_c[, w_hr]). Returns output, finals,
    attentions."""
    directions = 2 if bidirectional else 1
    finals = [[] for _ in states]
    attentions = []
    x = input
    for layer_index in range(num_layers):
        outputs = []
        for direction in range(directions):
            index = layer_index * directions + direction
            w_ih, w_hh, b_ih, b_hh, w_q, b_q, w_k, b_k, w_v, b_v, w_c, *w_hr = weights[index]
            y, last, _, attention = attention_layer(
                cell, x, [s[index] for s in states], w_ih, w_hh, b_ih, b_hh, w_q, b_q, w_k, b_k, w_v, b_v, w_c,
                num_heads, window, memory, memory_lengths, reverse=direction == 1, lengths=lengths,
                weight_hr=w_hr[0] if w_hr else None)
            outputs.append(y)
            attentions.append(attention)
            for collected, state in zip(finals, last):
                collected.append(state)
        x = torch.cat(outputs, dim=2)
    return x, [torch.stack(c, dim=0) for c in finals], attentions


def causal_self_attention(y: Tensor, weight_q, bias_q, weight_k, bias_k, weight_v, bias_v, weight_o, bias_o,
                          num_heads: int, window: int | None = None) -> Tensor:
    """The attention part of the hybrid block, one query at a time: y (T, B, W) -> y + W_o MHA(y)."""
    steps, batch, _ = y.shape
    width = weight_q.shape[0]
    head_dim = width // num_heads
    q = _linear(y, weight_q, bias_q).reshape(steps, batch, num_heads, head_dim)
    k = _linear(y, weight_k, bias_k).reshape(steps, batch, num_heads, head_dim)
    v = _linear(y, weight_v, bias_v).reshape(steps, batch, num_heads, head_dim)
    out = []
    for t in range(steps):
        first = 0 if window is None else max(0, t - window + 1)
        scores = torch.einsum("bhd,sbhd->bhs", q[t], k[first : t + 1]) * head_dim ** -0.5
        weights = torch.softmax(scores, dim=-1)
        out.append(torch.einsum("bhs,sbhd->bhd", weights, v[first : t + 1]).reshape(batch, width))
    context = torch.stack(out) if out else y.new_zeros((0, batch, width))
    return y + _linear(context, weight_o, bias_o)
