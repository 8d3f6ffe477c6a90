"""AttnLSTM, AttnGRU, AttnRNN: recurrent layers whose cell attends over a memory at every step
(SPEC.md, "The attention-augmented cell").

Each takes its base module's arguments plus ``num_heads``, ``head_dim``, ``window`` and
``memory_size``. With ``memory_size=None`` every layer attends over its own past states (self
memory, the ``window`` most recent, None = all); with ``memory_size=M`` it attends over the
``memory`` passed to ``forward`` (an encoder's outputs, (S, B, M), or (B, S, M) with batch_first),
ignoring positions at or past ``memory_lengths[b]``.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from . import _ops, functional
from .modules import _GATES, RecurrentBase, _detached

# One layer's parameters in the attention forward op's argument order (weight_hr: the LSTM's
# projection, None without one).
_OP_PARTS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_q", "bias_q", "weight_k", "bias_k", "weight_v",
             "bias_v", "weight_c")
_LSTM_OP_PARTS = _OP_PARTS[:4] + ("weight_hr",) + _OP_PARTS[4:]


def _positive_int(owner: str, name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        wanted = "an int or None" if allow_none else "an int"
        raise TypeError(f"{owner}: {name} must be {wanted}, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{owner}: {name} must be >= 1{' or None' if allow_none else ''}, got {value}")


def _time_major_memory(owner: str, memory_size: int | None, batch_first: bool, memory: Tensor | None, memory_lengths,
                       batched: bool, batch: int):
    """A module's memory in the op's layout (S, B, M) and its lengths as int64 (B,), after checking them."""
    if memory_size is None:
        if memory is not None or memory_lengths is not None:
            raise ValueError(f"{owner}: built for self memory (memory_size=None), got a memory; construct it with "
                             "memory_size=M to attend over an external memory")
        return None, None
    if memory is None:
        raise ValueError(f"{owner}: built with memory_size={memory_size}: forward needs memory "
                         f"({'(B, S, M)' if batch_first else '(S, B, M)'}), got None")
    if not isinstance(memory, Tensor):
        raise TypeError(f"{owner}: memory must be a Tensor, got {type(memory).__name__}")
    wanted = 3 if batched else 2
    if memory.dim() != wanted:
        raise ValueError(f"{owner}: for {'batched' if batched else 'unbatched'} input, memory must be {wanted}-D, "
                         f"got shape {tuple(memory.shape)}")
    if not batched:
        memory = memory.unsqueeze(1)
    elif batch_first:
        memory = memory.transpose(0, 1)
    if memory.shape[1] != batch or memory.shape[2] != memory_size:
        raise ValueError(f"{owner}: memory must have batch {batch} and memory_size {memory_size}, got shape "
                         f"{tuple(memory.shape)} (time-major: (S, B, M))")
    if memory_lengths is not None:
        if not isinstance(memory_lengths, Tensor):
            memory_lengths = torch.as_tensor(memory_lengths)
        if memory_lengths.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{owner}: memory_lengths must hold integers, got {memory_lengths.dtype}")
        memory_lengths = memory_lengths.to(device=memory.device, dtype=torch.int64).reshape(-1)
    return memory, memory_lengths


def _streamer_memory(owner: str, memory_size: int | None, batch_first: bool, memory: Tensor | None, memory_lengths):
    """A streamer's memory, whose batch is its steps' ((S, M): batch 1), as _time_major_memory gives it."""
    batched = not (isinstance(memory, Tensor) and memory.dim() == 2)
    batch = memory.shape[0 if batch_first else 1] if isinstance(memory, Tensor) and memory.dim() == 3 else 1
    return _time_major_memory(owner, memory_size, batch_first, memory, memory_lengths, batched, batch)


class AttentionRecurrentBase(RecurrentBase):
    """Shared machinery of the attention-augmented modules."""

    def __init__(self, cell: str, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, num_heads: int = 1,
                 head_dim: int | None = None, window: int | None = None, memory_size: int | None = None,
                 device=None, dtype=None, proj_size: int = 0) -> None:
        owner = type(self).__name__
        _positive_int(owner, "num_heads", num_heads)
        _positive_int(owner, "head_dim", head_dim, allow_none=True)
        _positive_int(owner, "window", window, allow_none=True)
        _positive_int(owner, "memory_size", memory_size, allow_none=True)
        if head_dim is None:
            # The query reads h: by default the attention is as wide as h (proj_size with a projection).
            state_size = proj_size if isinstance(proj_size, int) and proj_size > 0 else hidden_size
            size_name = "proj_size" if state_size is proj_size else "hidden_size"
            if not isinstance(state_size, int) or state_size % num_heads != 0:
                raise ValueError(f"{owner}: num_heads ({num_heads}) must divide {size_name} ({state_size}) when "
                                 "head_dim is not given")
            head_dim = state_size // num_heads
        if window is not None and memory_size is not None:
            raise ValueError(f"{owner}: window applies to self memory only; got window={window} with "
                             f"memory_size={memory_size} (an external memory has no window)")
        # Read by _extra_parameter_shapes during the base constructor.
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.window = window
        self.memory_size = memory_size
        super().__init__(cell, input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         proj_size, device, dtype)

    @property
    def attention_width(self) -> int:
        return self.num_heads * self.head_dim

    def _memory_width(self) -> int:
        return self.memory_size if self.memory_size is not None else self.state_size

    def _extra_parameter_shapes(self, layer: int, suffix: str) -> list[tuple[str, tuple[int, ...]]]:
        width, memory_width = self.attention_width, self._memory_width()
        shapes: list[tuple[str, tuple[int, ...]]] = []
        for part, columns in (("q", self.state_size), ("k", memory_width), ("v", memory_width)):
            shapes.append((f"weight_{part}_l{layer}{suffix}", (width, columns)))
            if self.bias:
                shapes.append((f"bias_{part}_l{layer}{suffix}", (width,)))
        shapes.append((f"weight_c_l{layer}{suffix}", (_GATES[self.cell] * self.hidden_size, width)))
        return shapes

    def _init_bound(self, name: str) -> float:
        # Each projection is scaled by its fan-in, as torch.nn scales W_hh by 1/sqrt(H).
        part = name.split("_")[1]
        if part in ("k", "v"):
            return 1.0 / math.sqrt(self._memory_width())
        if part == "c":
            return 1.0 / math.sqrt(self.attention_width)
        if part == "q":
            return 1.0 / math.sqrt(self.state_size)
        return 1.0 / math.sqrt(self.hidden_size)

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", num_heads={self.num_heads}, head_dim={self.head_dim}"
        if self.window is not None:
            s += f", window={self.window}"
        if self.memory_size is not None:
            s += f", memory_size={self.memory_size}"
        return s

    def _op_parts(self) -> tuple[str, ...]:
        return _LSTM_OP_PARTS if self.cell == "lstm" else _OP_PARTS

    def _attention_weights(self) -> list[tuple[Tensor | None, ...]]:
        """Per layer and direction the weights functional.attention_stack takes (w_hr last, with a
        projection)."""
        parts = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_q", "bias_q", "weight_k", "bias_k",
                 "weight_v", "bias_v", "weight_c") + (("weight_hr",) if self.proj_size > 0 else ())
        return [self._weights_of(index, parts) for index in range(len(self._all_weights))]

    def _memory(self, memory: Tensor | None, memory_lengths, batched: bool, batch: int):
        """memory in the op's layout (S, B, M) and the lengths as int64 (B,), after checking them."""
        return _time_major_memory(type(self).__name__, self.memory_size, self.batch_first, memory, memory_lengths,
                                  batched, batch)

    def forward(self, input: Tensor | PackedSequence, hx=None, memory: Tensor | None = None, memory_lengths=None,
                need_weights: bool = False, lengths=None):
        """Returns ``output, h_n`` (AttnLSTM: ``output, (h_n, c_n)``), and with ``need_weights`` also the
        attention weights of every layer and direction (index ``layer * D + direction``), each
        (T, B, num_heads, slots) in the input's layout (batch first with ``batch_first``; time-major
        for PackedSequence input). Variable lengths come as a PackedSequence input or as ``lengths``
        (B,): a row stops after its last valid step, attends over its valid states only, and its
        later outputs are zero."""
        try:  # free until something fails
            if not need_weights:
                in_cpp = self._run_attention_layers(input, hx, memory, memory_lengths, lengths=lengths)
                if in_cpp is not None:
                    output, finals, _, _ = in_cpp
                    if isinstance(input, PackedSequence):
                        output = PackedSequence(output, input.batch_sizes, input.sorted_indices, input.unsorted_indices)
                    return output, ((finals[0], finals[1]) if self.cell == "lstm" else finals[0])
            return self._forward_general(input, hx, memory, memory_lengths, need_weights, lengths)
        except (TypeError, ValueError, RuntimeError) as error:
            self._raise_parameter_fault(error, input)
            raise

    def _forward_general(self, input, hx, memory, memory_lengths, need_weights, lengths):
        prepared = self._prepare(input, hx, lengths)
        x = prepared.x
        memory, memory_lengths = self._memory(memory, memory_lengths, prepared.batched, x.shape[1])
        memory, memory_lengths = prepared.packed_order(memory, 1), prepared.packed_order(memory_lengths, 0)
        output, finals, attentions = functional.attention_stack(
            self.cell, x, prepared.states, self._attention_weights(), self.num_layers, self.bidirectional,
            self.num_heads, self.window, memory, memory_lengths, dropout=self.dropout, training=self.training,
            need_weights=need_weights, lengths=prepared.lengths,
        )
        output, finals = self._finish(output, finals, prepared)
        state = (finals[0], finals[1]) if self.cell == "lstm" else finals[0]
        if not need_weights:
            return output, state
        return output, state, self._weights_in_caller_layout(attentions, prepared)

    def _weights_in_caller_layout(self, attentions, prepared):
        """Time-major attention weights (T, B, heads, slots) in the layout of the caller's input."""
        attentions = [prepared.caller_order(a, 1) for a in attentions]
        if not prepared.batched:
            return [a.squeeze(1) for a in attentions]
        if self.batch_first and prepared.packed is None:
            return [a.transpose(0, 1) for a in attentions]
        return attentions

    def _run_attention_layers(self, input: Tensor | PackedSequence, hx, memory: Tensor | None, memory_lengths,
                              past_keys: list | None = None, past_values: list | None = None,
                              carry_slots: bool = False, lengths=None):
        """A batched tensor, or a PackedSequence on the CPU, in C++ (``_C.run_attention_layers``, as
        ``RecurrentBase._run_layers``: both directions, CPU int64 lengths, the dropout between layers):
        ``(output, [finals], keys, values)`` (a PackedSequence's output: its packed data), keys and
        values per layer the self memory's slots to carry (``functional.carried_slots``) with
        ``carry_slots`` (one direction), else None. None for anything else, which the general path
        takes, and where bad input gets its errors."""
        if torch.compiler.is_compiling() or functional.in_forward_mode():
            return None
        if type(input) is PackedSequence:
            data = input.data
            if (lengths is not None or input.batch_sizes.numel() == 0 or not data.is_cpu or data.dim() != 2
                    or data.shape[1] != self.input_size):
                return None
            batch = int(input.batch_sizes[0])
        elif (type(input) is not Tensor or input.dim() != 3 or input.shape[2] != self.input_size
                or input.shape[1 if self.batch_first else 0] == 0):
            return None
        else:
            batch = input.shape[0 if self.batch_first else 1]
        memory, memory_lengths = self._memory(memory, memory_lengths, True, batch)
        call = self._layer_call()
        batch_first = self.batch_first and type(input) is Tensor  # (a PackedSequence is time-major)
        return _ops.run_attention_layers(self.cell, input, hx, self.input_size, call.widths, batch_first, self,
                                         call.names, call.directions, lengths, self._dropout_between_layers(),
                                         self.num_heads, self.window, memory, memory_lengths, past_keys, past_values,
                                         carry_slots)

    def streamer(self, memory: Tensor | None = None, memory_lengths=None) -> _ops.Streamer:
        """As :meth:`RecurrentBase.streamer`, for the attention cell: its ``state`` is an
        :class:`AttentionState`, as :meth:`stream` returns it (self memory: each layer's most recent
        ``window - 1`` slots' keys and values). An external memory (``memory_size``) is given here, as to
        ``forward`` ((S, B, M), (B, S, M) with ``batch_first``, (S, M) for unbatched steps), with its
        lengths, and copied: every step attends over it, its keys and values computed once, here
        (``stream`` computes them at every call). Its batch is every step's. ``reset(state=None,
        memory=None, memory_lengths=None)`` starts a new sequence, over a new memory (given as here,
        of any batch) when one is given, else over the same one: a decoder's next utterance without
        copying the weights again. ``step(x, need_weights=True)`` returns ``(output, weights)``, weights
        a list with each layer's attention weights of that step, (B, num_heads, slots) (as ``forward``'s
        for that step; unbounded self memory: every state so far, without forward's leading zeros)."""
        self._check_unidirectional("streamer")
        prepare = functools.partial(_streamer_memory, type(self).__name__, self.memory_size, self.batch_first)
        memory, memory_lengths = prepare(memory, memory_lengths)
        return _ops.Streamer(self.cell, _detached(self._attention_weights()), self.input_size,
                             list(self._state_widths()), num_heads=self.num_heads, window=self.window, memory=memory,
                             memory_lengths=memory_lengths, prepare_memory=prepare)

    def stream(self, input: Tensor, state: AttentionState | None = None, memory: Tensor | None = None,
               memory_lengths=None, need_weights: bool = False):
        """Runs one chunk of a sequence (one step or more) and returns ``(output, state)``: chunk by
        chunk gives the outputs of one call over the whole sequence. The state (:class:`AttentionState`)
        carries the cell's states and, for self memory, each layer's most recent ``window - 1`` slots'
        keys and values (all of them when ``window`` is None: that memory grows with the sequence).
        With ``need_weights`` it returns ``(output, state, weights)``, each layer's attention weights of
        the chunk as ``forward`` gives them, (T, B, num_heads, slots); with unbounded self memory the
        slots are the P carried ones and the chunk's T (``forward`` over the whole sequence has its
        length's, zeros before the first). Unidirectional modules only."""
        self._check_streamable(input)
        if state is not None and not isinstance(state, AttentionState):
            raise TypeError(f"{type(self).__name__}: state must be an AttentionState (from a previous stream call) or "
                            f"None, got {type(state).__name__}")
        hx = None if state is None else ((state.h, state.c) if self.cell == "lstm" else state.h)
        self_memory = self.memory_size is None
        try:  # free until something fails
            if not need_weights:
                in_cpp = self._run_attention_layers(input, hx, memory, memory_lengths,
                                                    None if state is None else state.keys,
                                                    None if state is None else state.values, carry_slots=self_memory)
                if in_cpp is not None:
                    output, finals, keys, values = in_cpp
                    carried = (keys, values) if self_memory else (None, None)
                    return output, AttentionState(finals[0], finals[1] if self.cell == "lstm" else None, *carried)
            return self._stream_general(input, state, hx, memory, memory_lengths, need_weights)
        except (TypeError, ValueError, RuntimeError) as error:
            self._raise_parameter_fault(error, input)
            raise

    def _stream_general(self, input, state, hx, memory, memory_lengths, need_weights=False):
        self_memory = self.memory_size is None
        prepared = self._prepare(input, hx)
        memory, memory_lengths = self._memory(memory, memory_lengths, prepared.batched, prepared.x.shape[1])
        x, finals = prepared.x, [[] for _ in prepared.states]
        keys, values, attentions = [], [], []
        for layer, weights in enumerate(self._attention_weights()):
            initial = [s[layer] for s in prepared.states]
            past_k = None if state is None or state.keys is None else state.keys[layer]
            past_v = None if state is None or state.values is None else state.values[layer]
            y, last, _, attention = functional.attention_layer(
                self.cell, x, initial, weights, self.num_heads, self.window, memory, memory_lengths,
                past_keys=past_k, past_values=past_v, need_weights=need_weights)
            attentions.append(attention)
            if self_memory:
                k, v = functional.carried_slots(initial[0], y, weights, self.window, past_k, past_v)
                keys.append(k)
                values.append(v)
            for collected, s in zip(finals, last):
                collected.append(s)
            x = y
            if self.dropout > 0.0 and self.training and layer < self.num_layers - 1:
                x = torch.nn.functional.dropout(x, p=self.dropout, training=True)
        output, finals = self._finish(x, [functional.stacked_states(f) for f in finals], prepared)
        carried = (keys, values) if self_memory else (None, None)
        state = AttentionState(finals[0], finals[1] if self.cell == "lstm" else None, *carried)
        if not need_weights:
            return output, state
        return output, state, self._weights_in_caller_layout(attentions, prepared)


class AttentionState(NamedTuple):
    """What :meth:`AttentionRecurrentBase.stream` carries from one chunk to the next: h (and c for
    AttnLSTM) as ``forward`` returns them, and per layer the self memory's past slots (P, B, D) or
    None (none yet, window 1, or external memory)."""

    h: Tensor
    c: Tensor | None
    keys: list[Tensor | None] | None
    values: list[Tensor | None] | None


class AttnLSTM(AttentionRecurrentBase):
    """LSTM whose cell attends over a memory every step: ``output, (h_n, c_n)``. ``proj_size`` as in
    :class:`LSTM`: h is then P wide, and so are the query's and the self memory's inputs
    (``weight_q``, and for self memory ``weight_k``, ``weight_v``, have P columns)."""

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, num_heads=1, head_dim=None, window=None, memory_size=None, device=None,
                 dtype=None, proj_size=0):
        super().__init__("lstm", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         num_heads, head_dim, window, memory_size, device, dtype, proj_size)


class AttnGRU(AttentionRecurrentBase):
    """GRU whose cell attends over a memory every step: ``output, h_n``."""

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, num_heads=1, head_dim=None, window=None, memory_size=None, device=None,
                 dtype=None):
        super().__init__("gru", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         num_heads, head_dim, window, memory_size, device, dtype)


class AttnRNN(AttentionRecurrentBase):
    """Elman RNN (``nonlinearity`` 'tanh' or 'relu') whose cell attends over a memory: ``output, h_n``."""

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, num_heads=1, head_dim=None, window=None, memory_size=None,
                 device=None, dtype=None):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"AttnRNN: nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        super().__init__(f"rnn_{nonlinearity}", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, num_heads, head_dim, window, memory_size, device, dtype)
