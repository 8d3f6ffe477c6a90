"""Functional form of the recurrent layers over ``torch.ops.rnnattn``.

``layer`` runs one layer in one direction; ``stack`` runs a whole (multi-layer, optionally
bidirectional) recurrent network the way ``torch.nn.RNN/LSTM/GRU`` do, time-major.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _ops

CELLS = _ops.CELLS


def _num_states(cell: str) -> int:
    return _ops.CELL_LAYOUTS[cell][1]


def needs_workspace(*tensors: Tensor | None) -> bool:
    """True when autograd will differentiate through the op: it must then save activations."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


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
    """One recurrent layer, one direction.

    input (T, B, I); states: (B, H) tensors, ``[h0, c0]`` for "lstm", ``[h0]`` otherwise.
    Returns the output (T, B, H) and the final states.
    """
    if cell not in CELLS:
        raise ValueError(f"rnnattn_ext.functional.layer: cell must be one of {CELLS}, got {cell!r}")
    if len(states) != _num_states(cell):
        raise ValueError(
            f"rnnattn_ext.functional.layer: cell {cell!r} takes {_num_states(cell)} state tensor(s), got {len(states)}"
        )
    training = needs_workspace(input, *states, weight_ih, weight_hh, bias_ih, bias_hh)
    result = _ops.forward_op(cell)(input, *states, weight_ih, weight_hh, bias_ih, bias_hh, reverse, training)
    return result[0], list(result[1:-1])


def stack(
    cell: str,
    input: Tensor,
    states: Sequence[Tensor],
    weights: Sequence[Sequence[Tensor | None]],
    num_layers: int,
    bidirectional: bool,
    dropout: float = 0.0,
    training: bool = False,
) -> tuple[Tensor, list[Tensor]]:
    """A stack of layers as in torch.nn: time-major ``input`` (T, B, I).

    states: one (num_layers * D, B, H) tensor per cell state; weights: for each layer and
    direction (index ``layer * D + direction``) the tuple ``(w_ih, w_hh, b_ih, b_hh)``.
    Returns the last layer's output (T, B, D * H) and the final states, each (num_layers * D, B, H).
    """
    directions = 2 if bidirectional else 1
    finals: list[list[Tensor]] = [[] for _ in states]
    x = input
    for layer_index in range(num_layers):
        outputs = []
        for direction in range(directions):
            index = layer_index * directions + direction
            w_ih, w_hh, b_ih, b_hh = weights[index]
            y, last = layer(
                cell, x, [s[index] for s in states], w_ih, w_hh, b_ih, b_hh, reverse=direction == 1
            )
            outputs.append(y)
            for collected, state in zip(finals, last):
                collected.append(state)
        x = outputs[0] if directions == 1 else torch.cat(outputs, dim=2)
        if dropout > 0.0 and training and layer_index < num_layers - 1:
            x = F.dropout(x, p=dropout, training=True)
    return x, [torch.stack(collected, dim=0) for collected in finals]
