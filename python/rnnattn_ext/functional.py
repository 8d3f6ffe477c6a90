"""Functional form of the recurrent layers over ``torch.ops.rnnattn``.

``layer`` runs one layer in one direction; ``stack`` runs a whole (multi-layer, optionally
bidirectional) recurrent network the way ``torch.nn.RNN/LSTM/GRU`` do, time-major. On the CPU,
bfloat16 and float16 layers compute in float32 and return their results in their own dtype; a
bfloat16 layer's products run in bfloat16 where the CPU has AVX512-BF16 (float32 sums).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import forward_ad

from . import _ops, unrolled

CELLS = _ops.CELLS


def _num_states(cell: str) -> int:
    return _ops.CELL_LAYOUTS[cell][1]


def _check_cell(function: str, cell: str, states: Sequence[Tensor]) -> None:
    """The cell name and its number of states, as the ops cannot check them (they are per cell)."""
    if cell not in CELLS:
        raise ValueError(f"rnnattn_ext.functional.{function}: cell must be one of {CELLS}, got {cell!r}")
    if len(states) != _num_states(cell):
        raise ValueError(f"rnnattn_ext.functional.{function}: cell {cell!r} takes {_num_states(cell)} state "
                         f"tensor(s), got {len(states)}")


def _projection_args(function: str, cell: str, weight_hr: Tensor | None) -> tuple[Tensor | None, ...]:
    """weight_hr as the op takes it: an argument of the projected cells' ops only."""
    if cell in _ops.PROJECTED_CELLS:
        return (weight_hr,)
    if weight_hr is not None:
        raise ValueError(f"rnnattn_ext.functional.{function}: weight_hr (a projection) is defined for "
                         f"{_ops.PROJECTED_CELLS} only, got cell {cell!r}")
    return ()


#: The attention ops compute in float32 or float64 on the CPU: bfloat16 and float16 tensors go through
#: float32 there (SPEC: reduced precision computes in fp32) and the results come back in their dtype
#: (autograd casts the gradients back too), as torch.nn's CPU layers take those dtypes. (The base
#: layers' ops take them as they are and compute in float32 themselves.)
_CPU_REDUCED = (torch.bfloat16, torch.float16)


def _cpu_reduced_dtype(input: Tensor) -> torch.dtype | None:
    """The input's dtype when the op must compute it in float32 (reduced precision on the CPU), else None
    (also inside CPU autocast, whose rule for the ops casts reduced-precision arguments up itself)."""
    if input.dtype not in _CPU_REDUCED or input.device.type != "cpu":
        return None
    return None if torch.is_autocast_enabled("cpu") else input.dtype


def _upcast(function: str, reduced: torch.dtype, **tensors: Tensor | None) -> list[Any]:
    """The named tensors (None for an absent one) in float32; each must have the input's dtype, as
    the op requires of them. (Any: each caller knows which of its tensors may be None.)"""
    for name, t in tensors.items():
        if t is not None and t.dtype != reduced:
            raise TypeError(f"rnnattn_ext.functional.{function}: {name} must have the dtype of input ({reduced}), "
                            f"got {t.dtype}")
    return [None if t is None else t.float() for t in tensors.values()]


def _jit_tracing() -> bool:
    """Whether torch.jit.trace is recording (never under torch.compile, which traces on its own)."""
    return not torch.compiler.is_compiling() and torch.jit.is_tracing()


# While torch.jit.trace records a stack (a module's layers): whether it is training (train mode).
_traced = threading.local()


def _traced_training() -> bool:
    return getattr(_traced, "training", True)


@contextlib.contextmanager
def _traced_stack(training: bool):
    """Marks what torch.jit.trace records inside as training or not: a trace of a module in eval mode
    saves no activations (an inference trace), one in train mode saves them if a tensor requires grad."""
    previous = _traced_training()
    _traced.training = training
    try:
        yield
    finally:
        _traced.training = previous


def needs_workspace(*tensors: Tensor | None) -> bool:
    """True when autograd will differentiate through the op: it must then save activations. Under
    torch.compile inside a torch.func transform (grad, vjp) the traced tensors do not show the
    transform's requires_grad: there the activations are saved whatever they show. While torch.jit.trace
    records, grad mode is left out (its check re-traces under no_grad and must record the same graph):
    a tensor must require grad and the stack being traced (``_traced_stack``) must be training."""
    if _jit_tracing():
        return _traced_training() and any(t is not None and t.requires_grad for t in tensors)
    if not torch.is_grad_enabled():
        return False
    if torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active():
        return True
    return any(t is not None and t.requires_grad for t in tensors)


def in_forward_mode() -> bool:
    """Whether a forward-mode level is open (torch.func.jvp, jacfwd, torch.autograd.forward_ad)."""
    return forward_ad._current_level >= 0


def _carries_tangents(*arguments: Any) -> bool:
    """Whether a tensor among the arguments has a forward-mode tangent."""
    return in_forward_mode() and any(isinstance(a, Tensor) and forward_ad.unpack_dual(a).tangent is not None
                                     for a in arguments)


def _call_op(op, decomposed, arguments: tuple, training: bool, after_training: tuple = ()) -> tuple:
    """``op(*arguments, training, *after_training)``. The ops have reverse-mode gradients only: when an
    argument carries a forward-mode tangent the layer runs as ``decomposed`` instead (``unrolled``'s
    plain torch operations, the op's results to rounding, which torch differentiates in either mode),
    after the op has run on the primal values (its result unused), as ``unrolled`` has no argument
    checks of its own: bad arguments then get the op's errors, which name them. The op costs a
    fraction of what ``unrolled`` does."""
    if not _carries_tangents(*arguments):
        return op(*arguments, training, *after_training)
    primals = [forward_ad.unpack_dual(a).primal if isinstance(a, Tensor) else a for a in arguments]
    with torch.no_grad():
        op(*primals, False, *after_training)
    return decomposed(*arguments, training, *after_training)


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
    """One recurrent layer, one direction.

    input (T, B, I); states: (B, H) tensors, ``[h0, c0]`` for "lstm", ``[h0]`` otherwise;
    lengths: optional (B,) int64 on the input's device, values in [1, T] (SPEC "Variable lengths":
    row b stops after step lengths[b]; its later outputs are zero); weight_hr: "lstm" only, the
    projection (P, H) of torch.nn's proj_size (h0 and the output are then P wide, weight_hh (4H, P)).
    Returns the output (T, B, H) and the final states.
    """
    _check_cell("layer", cell, states)
    projection = _projection_args("layer", cell, weight_hr)
    training = needs_workspace(input, *states, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr)
    # (bfloat16 and float16 on the CPU: the op computes them in float32 itself.)
    arguments = (input, *states, weight_ih, weight_hh, bias_ih, bias_hh, *projection, lengths, reverse)
    result = _call_op(_ops.forward_op(cell), unrolled.base_op(cell), arguments, training)
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
    lengths: Tensor | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """A stack of layers as in torch.nn: time-major ``input`` (T, B, I).

    states: one (num_layers * D, B, H) tensor per cell state; weights: for each layer and
    direction (index ``layer * D + direction``) the tuple ``(w_ih, w_hh, b_ih, b_hh)``, or with a
    projection ``(w_ih, w_hh, b_ih, b_hh, w_hr)`` (torch.nn's order; h is then P wide); lengths as
    in ``layer``, for every layer and direction. ``training``: torch.nn's train mode (dropout between
    layers; under torch.jit.trace, False also records layers that save no activations for backward).
    Returns the last layer's output (T, B, D * H) and the final states, each (num_layers * D, B, H).
    """
    if _jit_tracing() and _traced_training() != training:
        with _traced_stack(training):  # the same call, with its mode marked
            return stack(cell, input, states, weights, num_layers, bidirectional, dropout, training, lengths)
    directions = 2 if bidirectional else 1
    finals: list[list[Tensor]] = [[] for _ in states]
    x = input
    for layer_index in range(num_layers):
        outputs = []
        for direction in range(directions):
            index = layer_index * directions + direction
            w_ih, w_hh, b_ih, b_hh, *w_hr = weights[index]
            if w_ih is None or w_hh is None:
                raise TypeError(f"rnnattn_ext.functional.stack: weights[{index}] must hold w_ih and w_hh, got None")
            y, last = layer(
                cell, x, [s[index] for s in states], w_ih, w_hh, b_ih, b_hh, reverse=direction == 1, lengths=lengths,
                weight_hr=w_hr[0] if w_hr else None,
            )
            outputs.append(y)
            for collected, state in zip(finals, last):
                collected.append(state)
        x = outputs[0] if directions == 1 else torch.cat(outputs, dim=2)
        if dropout > 0.0 and training and layer_index < num_layers - 1:
            x = F.dropout(x, p=dropout, training=True)
    return x, [stacked_states(collected) for collected in finals]


def stacked_states(states: list[Tensor]) -> Tensor:
    """The final states of every layer and direction, (num_layers * D, B, H)."""
    return states[0].unsqueeze(0) if len(states) == 1 else torch.stack(states, dim=0)


#: per layer and direction: (w_ih, w_hh, b_ih, b_hh, w_q, b_q, w_k, b_k, w_v, b_v, w_c), and with
#: a projection ("lstm") w_hr last
AttentionWeights = Sequence[Tensor | None]


def attention_layer(
    cell: str,
    input: Tensor,
    states: Sequence[Tensor],
    weights: AttentionWeights,
    num_heads: int,
    window: int | None = None,
    memory: Tensor | None = None,
    memory_lengths: Tensor | None = None,
    reverse: bool = False,
    need_weights: bool = False,
    lengths: Tensor | None = None,
    past_keys: Tensor | None = None,
    past_values: Tensor | None = None,
) -> tuple[Tensor, list[Tensor], Tensor, Tensor | None]:
    """One layer, one direction of the attention-augmented cell (SPEC.md), time-major.

    Self memory when ``memory`` is None (``window`` most recent states, None = all), else external
    memory (S, B, M) with optional ``memory_lengths`` (B,). Returns the output (T, B, H), the final
    states, the context vectors (T, B, D) and, with ``need_weights``, the attention weights
    (T, B, num_heads, slots) (else None). ``lengths`` as in ``layer``: a row attends only at its
    valid steps (zero context after them), and its self memory holds only its valid states.
    ``past_keys``, ``past_values`` (S, B, D): streaming, the keys and values of the self memory's S
    slots before the first step (oldest first), as ``carried_slots`` computes them. A twelfth
    weight w_hr (P, H) is the LSTM projection: h, the query's and the self memory's input, is then
    P wide.
    """
    _check_cell("attention_layer", cell, states)
    if len(weights) not in (11, 12):
        raise ValueError(
            "rnnattn_ext.functional.attention_layer: weights must be (w_ih, w_hh, b_ih, b_hh, w_q, b_q, w_k, b_k, "
            f"w_v, b_v, w_c[, w_hr]), got {len(weights)} entries"
        )
    training = needs_workspace(input, *states, *weights, memory, past_keys, past_values)
    reduced = _cpu_reduced_dtype(input)
    if reduced is not None:
        input, *states = _upcast("attention_layer", reduced, input=input,
                                 **{f"states[{i}]": s for i, s in enumerate(states)})
        weights = _upcast("attention_layer", reduced, **{f"weights[{i}]": w for i, w in enumerate(weights)})
        memory, past_keys, past_values = _upcast("attention_layer", reduced, memory=memory, past_keys=past_keys,
                                                 past_values=past_values)
    base, attention = list(weights[:4]), list(weights[4:11])
    projection = _projection_args("attention_layer", cell, weights[11] if len(weights) == 12 else None)
    arguments = (input, *states, *base, *projection, *attention, memory, memory_lengths, lengths, past_keys,
                 past_values, num_heads, window, reverse)
    result = _call_op(_ops.attention_forward_op(cell), unrolled.attention_op(cell), arguments, training,
                      (need_weights,))
    num_states = _num_states(cell)
    output, finals = result[0], list(result[1 : 1 + num_states])
    context, attention = result[1 + num_states], result[2 + num_states]
    if reduced is not None:
        output, context, attention = output.to(reduced), context.to(reduced), attention.to(reduced)
        finals = [f.to(reduced) for f in finals]
    return output, finals, context, attention if need_weights else None


def attention_stack(
    cell: str,
    input: Tensor,
    states: Sequence[Tensor],
    weights: Sequence[AttentionWeights],
    num_layers: int,
    bidirectional: bool,
    num_heads: int,
    window: int | None = None,
    memory: Tensor | None = None,
    memory_lengths: Tensor | None = None,
    dropout: float = 0.0,
    training: bool = False,
    need_weights: bool = False,
    lengths: Tensor | None = None,
) -> tuple[Tensor, list[Tensor], list[Tensor] | None]:
    """A stack of attention-augmented layers, as ``stack``: every layer attends over its own past
    states (self memory) or over the same external ``memory``. Returns the last layer's output,
    the final states and, with ``need_weights``, the attention weights of every layer and direction
    (index ``layer * D + direction``)."""
    if _jit_tracing() and _traced_training() != training:
        with _traced_stack(training):  # the same call, with its mode marked
            return attention_stack(cell, input, states, weights, num_layers, bidirectional, num_heads, window, memory,
                                   memory_lengths, dropout, training, need_weights, lengths)
    directions = 2 if bidirectional else 1
    finals: list[list[Tensor]] = [[] for _ in states]
    attentions: list[Tensor] = []
    x = input
    for layer_index in range(num_layers):
        outputs = []
        for direction in range(directions):
            index = layer_index * directions + direction
            y, last, _context, attention = attention_layer(
                cell, x, [s[index] for s in states], weights[index], num_heads, window, memory, memory_lengths,
                reverse=direction == 1, need_weights=need_weights, lengths=lengths,
            )
            outputs.append(y)
            if attention is not None:
                attentions.append(attention)
            for collected, state in zip(finals, last):
                collected.append(state)
        x = outputs[0] if directions == 1 else torch.cat(outputs, dim=2)
        if dropout > 0.0 and training and layer_index < num_layers - 1:
            x = F.dropout(x, p=dropout, training=True)
    return x, [stacked_states(collected) for collected in finals], attentions if need_weights else None


def carried_slots(
    initial_h: Tensor,
    output: Tensor,
    weights: AttentionWeights,
    window: int | None,
    past_keys: Tensor | None = None,
    past_values: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """Streaming self memory: the keys and values the next call of ``attention_layer`` takes as
    ``past_keys``/``past_values`` to continue the sequence this call ran.

    This call's slots were its past ones, then the states before each of its steps: ``initial_h``
    (B, H) and ``output[:-1]``. The next call makes its first slot itself (from its initial state,
    this call's final h), so it needs the ``window - 1`` most recent of them (every one when
    ``window`` is None), oldest first; None when there are none. Only the new slots' keys and values
    are computed, once each.
    """
    w_k, b_k, w_v, b_v = weights[6], weights[7], weights[8], weights[9]
    if w_k is None or w_v is None:
        raise TypeError("rnnattn_ext.functional.carried_slots: weights must hold w_k and w_v, got None")
    if (past_keys is None) != (past_values is None):
        raise ValueError("rnnattn_ext.functional.carried_slots: past_keys and past_values come together, got one "
                         "of them")
    wanted = None if window is None else window - 1
    if wanted == 0:
        return None, None
    states = torch.cat([initial_h.unsqueeze(0), output[:-1]], dim=0)  # (T, B, H)
    if wanted is not None:
        states = states[-wanted:]
    keys, values = F.linear(states, w_k, b_k), F.linear(states, w_v, b_v)
    if past_keys is not None and past_values is not None:
        keys, values = torch.cat([past_keys, keys], dim=0), torch.cat([past_values, values], dim=0)
        if wanted is not None:
            keys, values = keys[-wanted:], values[-wanted:]
    return keys, values
