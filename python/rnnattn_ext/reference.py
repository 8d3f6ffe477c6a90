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


def lstm_cell(x, h, c, w_ih, w_hh, b_ih=None, b_hh=None):
    gates = _linear(x, w_ih, b_ih) + _linear(h, w_hh, b_hh)
    i, f, g, o = gates.chunk(4, dim=-1)
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    c_next = f * c + i * g
    return o * torch.tanh(c_next), c_next


def gru_cell(x, h, w_ih, w_hh, b_ih=None, b_hh=None):
    xr, xz, xn = _linear(x, w_ih, b_ih).chunk(3, dim=-1)
    hr, hz, hn = _linear(h, w_hh, b_hh).chunk(3, dim=-1)
    r = torch.sigmoid(xr + hr)
    z = torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    return (1 - z) * n + z * h


def rnn_cell(x, h, w_ih, w_hh, b_ih=None, b_hh=None, nonlinearity="tanh"):
    pre = _linear(x, w_ih, b_ih) + _linear(h, w_hh, b_hh)
    return torch.tanh(pre) if nonlinearity == "tanh" else torch.relu(pre)


def _step(cell: str, x, states, weights):
    if cell == "lstm":
        return list(lstm_cell(x, *states, *weights))
    if cell == "gru":
        return [gru_cell(x, *states, *weights)]
    if cell in ("rnn_tanh", "rnn_relu"):
        return [rnn_cell(x, *states, *weights, nonlinearity=cell[4:])]
    raise ValueError(f"unknown cell {cell!r}")


def layer(
    cell: str,
    input: Tensor,
    states: Sequence[Tensor],
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Tensor | None = None,
    bias_hh: Tensor | None = None,
    reverse: bool = False,
) -> tuple[Tensor, list[Tensor]]:
    """One layer, one direction, time-major: the reference of ``functional.layer``."""
    states = list(states)
    steps = range(input.shape[0] - 1, -1, -1) if reverse else range(input.shape[0])
    outputs = [None] * input.shape[0]
    for t in steps:
        states = _step(cell, input[t], states, (weight_ih, weight_hh, bias_ih, bias_hh))
        outputs[t] = states[0]
    if outputs:
        output = torch.stack(outputs, dim=0)
    else:
        output = input.new_zeros((0, input.shape[1], weight_hh.shape[1]))
    return output, states


def stack(cell, input, states, weights, num_layers, bidirectional):
    """Reference of ``functional.stack`` (no dropout)."""
    directions = 2 if bidirectional else 1
    finals = [[] for _ in states]
    x = input
    for layer_index in range(num_layers):
        outputs = []
        for direction in range(directions):
            index = layer_index * directions + direction
            y, last = layer(cell, x, [s[index] for s in states], *weights[index], reverse=direction == 1)
            outputs.append(y)
            for collected, state in zip(finals, last):
                collected.append(state)
        x = torch.cat(outputs, dim=2)
    return x, [torch.stack(c, dim=0) for c in finals]
