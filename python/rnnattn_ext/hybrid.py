"""HybridBlock: a recurrent layer followed by causal multi-head self-attention with a residual.

SPEC "Hybrid block": y = RNN(x); h'_t = y_t + W_o · MHA(W_q y, W_k y, W_v y)_t, the attention causal
and optionally windowed. The attention runs over the whole sequence at once through
``torch.nn.functional.scaled_dot_product_attention``; only the recurrence is sequential. ``stream``
runs a sequence chunk by chunk, carrying the recurrent state and the window's keys and values.
"""

from __future__ import annotations

import threading
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import _ops, functional
from .modules import GRU, LSTM, RNN

_RECURRENT = {"lstm": LSTM, "gru": GRU, "rnn_tanh": RNN, "rnn_relu": RNN}


def causal_window_mask(steps: int, window: int | None, device=None, past: int = 0) -> Tensor | None:
    """Boolean (T, past + T) mask, True where query t may attend key s: the queries are positions
    past..past + T - 1 of the sequence, the keys 0..past + T - 1; s <= past + t and, with a window w,
    s > past + t - w (the w most recent positions, itself included). None means plain causal (no
    window and no past positions: scaled_dot_product_attention's is_causal)."""
    if window is None and past == 0:
        return None
    query = torch.arange(past, past + steps, device=device)
    offset = query.unsqueeze(1) - torch.arange(past + steps, device=device).unsqueeze(0)  # query - key
    return (offset >= 0) if window is None else (offset >= 0) & (offset < window)


def _recent_positions(keys: Tensor, values: Tensor, window: int | None) -> tuple[Tensor | None, Tensor | None]:
    """The keys and values (B, heads, P, head_dim) the next position attends besides its own: the last
    window - 1 (every one with no window; None for none)."""
    kept = keys.shape[2] if window is None else min(keys.shape[2], window - 1)
    if kept == 0:  # window 1: each position attends only itself
        return None, None
    return keys[:, :, keys.shape[2] - kept:], values[:, :, values.shape[2] - kept:]


class HybridState(NamedTuple):
    """What :meth:`HybridBlock.stream` carries from one chunk to the next: the recurrent layer's state
    (as its ``forward`` returns it: h_n, or (h_n, c_n) for an LSTM) and the attention's keys and values
    of the most recent ``window - 1`` positions (every position with no window), (B, num_heads, P,
    head_dim) ((num_heads, P, head_dim) for unbatched input), or None (before any, or with window 1)."""

    hidden: Any
    keys: Tensor | None
    values: Tensor | None


class HybridBlock(nn.Module):
    """Recurrent layer (``cell``: "lstm", "gru", "rnn_tanh", "rnn_relu") + causal windowed self-attention.

    Arguments of the recurrent layer as in torch.nn (``num_layers``, ``bias``, ``batch_first``,
    ``dropout``, ``bidirectional``); ``num_heads`` and ``head_dim`` give the attention width
    D = num_heads * head_dim (default head_dim: the recurrent output width / num_heads);
    ``window``: how many most recent positions (itself included) each position attends, None for all.

    ``forward(input, hx=None)`` returns ``(output, hidden)``: output has the recurrent layer's output
    shape, hidden is the recurrent layer's final state (``(h_n, c_n)`` for an LSTM).
    ``stream(chunk, state=None)`` returns ``(output, state)``: chunk by chunk, the outputs of one call;
    ``streamer()`` steps one position per call at the lowest cost, the state kept inside.
    """

    def __init__(self, input_size: int, hidden_size: int, num_heads: int = 1, head_dim: int | None = None,
                 window: int | None = None, cell: str = "lstm", num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__()
        if cell not in _RECURRENT:
            raise ValueError(f"HybridBlock: cell must be one of {tuple(_RECURRENT)}, got {cell!r}")
        if not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"HybridBlock: num_heads must be a positive int, got {num_heads!r}")
        if window is not None and (not isinstance(window, int) or window < 1):
            raise ValueError(f"HybridBlock: window must be None or an int >= 1, got {window!r}")
        width = hidden_size * (2 if bidirectional else 1)
        if head_dim is None:
            if width % num_heads != 0:
                raise ValueError(
                    f"HybridBlock: num_heads ({num_heads}) must divide the recurrent output width ({width}) "
                    "when head_dim is not given"
                )
            head_dim = width // num_heads
        if not isinstance(head_dim, int) or head_dim < 1:
            raise ValueError(f"HybridBlock: head_dim must be a positive int, got {head_dim!r}")
        factory = {"device": device, "dtype": dtype}
        kwargs = dict(num_layers=num_layers, bias=bias, batch_first=False, dropout=dropout,
                      bidirectional=bidirectional, **factory)
        if cell.startswith("rnn_"):
            kwargs["nonlinearity"] = cell[4:]
        self.recurrent = _RECURRENT[cell](input_size, hidden_size, **kwargs)
        self.cell = cell
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.window = window
        self.batch_first = batch_first
        attention_width = num_heads * head_dim
        self.query = nn.Linear(width, attention_width, bias=bias, **factory)
        self.key = nn.Linear(width, attention_width, bias=bias, **factory)
        self.value = nn.Linear(width, attention_width, bias=bias, **factory)
        self.out = nn.Linear(attention_width, width, bias=bias, **factory)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, window={self.window}"

    def forward(self, input: Tensor | PackedSequence, hx=None, lengths=None):
        """``output, hidden``: output (T, B, W) in the input's layout, hidden as the recurrent module's.
        ``lengths`` (B,) ints in [1, T]: each row as if run alone over its first lengths[b] steps
        (causal attention reads no later step), zeros after them. A PackedSequence input gives a
        PackedSequence output (as torch.nn's recurrent modules: hx and hidden in the caller's batch
        order), the same as the padded input with its lengths. A sequence of up to 16 steps and four
        rows of a float32 CPU block without autograd runs its attention in C++ (as ``stream``)."""
        if isinstance(input, PackedSequence):
            if lengths is not None:
                raise ValueError("HybridBlock: lengths is for a tensor input; a PackedSequence carries its own")
            return self._forward_packed(input, hx)
        batched = input.dim() == 3
        output, hidden = self._forward_time_major(self._time_major(input), hx, lengths)
        return self._in_callers_layout(output, batched), hidden

    def _forward_time_major(self, x: Tensor, hx, lengths):
        """forward on a time-major (T, B, I) or unbatched (T, I) input: output (T, B, W) (B = 1 unbatched)."""
        y, hidden = self.recurrent(x, hx, lengths=lengths)  # (T, B, W) or unbatched (T, W)
        seq = y if x.dim() == 3 else y.unsqueeze(1)
        attended = self._attend_in_cpp(seq, None, None)  # a short sequence without autograd
        output = attended[0] if attended is not None else self._attend(seq)[0]
        if lengths is not None:  # checked by the recurrent module
            steps = output.shape[0]
            valid = torch.as_tensor(lengths, device=output.device).reshape(1, -1, 1)
            output = output.masked_fill(torch.arange(steps, device=output.device).view(-1, 1, 1) >= valid, 0)
        return output, hidden

    def _forward_packed(self, input: PackedSequence, hx):
        padded, lengths = pad_packed_sequence(input)  # (T, B, I) in the caller's batch order
        output, hidden = self._forward_time_major(padded, hx, lengths)
        if input.sorted_indices is not None:  # packed data runs in the packing's order, longest first
            output = output.index_select(1, input.sorted_indices)
            lengths = lengths.index_select(0, input.sorted_indices.cpu())
        data = pack_padded_sequence(output, lengths).data
        return PackedSequence(data, input.batch_sizes, input.sorted_indices, input.unsorted_indices), hidden

    def stream(self, input: Tensor, state: HybridState | None = None):
        """Runs one chunk of a sequence (one step or more) and returns ``(output, state)``: feeding the
        returned :class:`HybridState` to the next call continues the sequence, so chunk by chunk gives
        the outputs of one call over the whole sequence (to rounding: the attention's products have
        other shapes). The state carries the recurrent state and the keys and values of the most
        recent ``window - 1`` positions (all of them when ``window`` is None: that cache grows with the
        sequence). Unidirectional blocks only; no lengths (a chunk's rows all run). A chunk of up to
        16 steps and four batch rows of a float32 CPU block without autograd runs its attention in C++ on
        the weights as they are now (``_attend_in_cpp``), to rounding the numbers of the torch
        operations; the state given is never changed, so several chunks may continue from one."""
        self.recurrent._check_streamable(input)
        if state is not None and not isinstance(state, HybridState):
            raise TypeError(f"HybridBlock: state must be None or a HybridState (from a previous stream call), got "
                            f"{type(state).__name__}")
        batched = input.dim() == 3
        hidden, past_keys, past_values = state if state is not None else (None, None, None)
        if (past_keys is None) != (past_values is None):
            raise ValueError("HybridBlock: state.keys and state.values must both be tensors or both None")
        if past_keys is not None and past_values is not None and not batched:
            past_keys, past_values = past_keys.unsqueeze(0), past_values.unsqueeze(0)
        y, hidden = self.recurrent.stream(self._time_major(input), hidden)
        seq = y if batched else y.unsqueeze(1)
        attended = self._attend_in_cpp(seq, past_keys, past_values)
        if attended is not None:
            output, kept_keys, kept_values = attended
        else:
            output, keys, values = self._attend(seq, past_keys, past_values)
            kept_keys, kept_values = _recent_positions(keys, values, self.window)
        if kept_keys is not None and kept_values is not None and not batched:
            kept_keys, kept_values = kept_keys.squeeze(0), kept_values.squeeze(0)
        return self._in_callers_layout(output, batched), HybridState(hidden, kept_keys, kept_values)

    def _attend_in_cpp(self, seq: Tensor, past_keys: Tensor | None, past_values: Tensor | None):
        """``_attend`` and ``_recent_positions`` for a chunk (T, B, W) of up to 16 steps and four batch
        rows in C++ (``_C.hybrid_stream_attention``: float32 on the CPU, no autograd needed), the output
        (T, B, W) and the state's keys and values; None where the torch operations must take it, and
        while Dynamo traces, as it cannot see into that call, or in forward mode (tangents), and where
        calling the projections would run more than their weights: a hook, or a module replaced by
        another kind (a LoRA adapter, a parametrization)."""
        if torch.compiler.is_compiling() or functional.in_forward_mode():
            return None
        query, key, value, out = self.query, self.key, self.value, self.out
        if _global_forward_hooks or _global_forward_pre_hooks or any(
                type(m) is not nn.Linear or m._forward_hooks or m._forward_pre_hooks for m in (query, key, value, out)):
            return None
        return _ops.hybrid_stream_attention(seq, query.weight, query.bias, key.weight, key.bias, value.weight,
                                            value.bias, out.weight, out.bias, self.num_heads, self.head_dim,
                                            self.window, past_keys, past_values)

    def streamer(self) -> HybridStreamer:
        """A :class:`HybridStreamer` for streaming inference one step per call, as the recurrent modules'
        ``streamer()``: ``step(x_t)`` takes (B, input_size) or (input_size,) and returns the block's
        output for that position; ``state`` and ``reset(state=None)`` as ``stream``'s HybridState. A
        snapshot of the weights; inference only. Unidirectional blocks only."""
        return HybridStreamer(self)

    def _time_major(self, input: Tensor) -> Tensor:
        return input.transpose(0, 1) if input.dim() == 3 and self.batch_first else input

    def _in_callers_layout(self, output: Tensor, batched: bool) -> Tensor:
        if not batched:
            return output.squeeze(1)
        return output.transpose(0, 1) if self.batch_first else output

    def _attend(self, seq: Tensor, past_keys: Tensor | None = None, past_values: Tensor | None = None):
        """seq (T, B, W), time-major -> (seq + W_o · attention, keys, values): the keys and values of every
        position attended, the past ones (B, heads, P, head_dim) first."""
        steps, batch, _ = seq.shape

        def heads(t: Tensor) -> Tensor:  # (T, B, D) -> (B, heads, T, head_dim)
            return t.view(steps, batch, self.num_heads, self.head_dim).permute(1, 2, 0, 3)

        q, k, v = heads(self.query(seq)), heads(self.key(seq)), heads(self.value(seq))
        past = 0
        if past_keys is not None and past_values is not None:
            expected = (batch, self.num_heads, past_keys.shape[2], self.head_dim)
            if tuple(past_keys.shape) != expected or past_values.shape != past_keys.shape:
                raise ValueError(f"HybridBlock: state.keys and state.values must have shape (batch, num_heads, P, "
                                 f"head_dim) = {expected} for this chunk, got {tuple(past_keys.shape)} and "
                                 f"{tuple(past_values.shape)}")
            if any(t.dtype != k.dtype or t.device != k.device for t in (past_keys, past_values)):
                raise TypeError(f"HybridBlock: state.keys and state.values must have the dtype ({k.dtype}) and device "
                                f"({k.device}) of this chunk's keys, got {past_keys.dtype} on {past_keys.device} "
                                f"and {past_values.dtype} on {past_values.device}")
            past = past_keys.shape[2]
            k, v = torch.cat([past_keys, k], 2), torch.cat([past_values, v], 2)
        if steps == 1 and (self.window is None or past < self.window):  # one query, every position in its window
            attended = F.scaled_dot_product_attention(q, k, v)
        elif (mask := causal_window_mask(steps, self.window, seq.device, past)) is None:
            attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        context = attended.permute(2, 0, 1, 3).reshape(steps, batch, self.num_heads * self.head_dim)
        return seq + self.out(context), k, v


class _KeptPositions:
    """The keys and values a HybridStreamer keeps: (B, capacity, D) buffers that hold, in order, the
    positions the next step attends besides its own at [first, first + count), with room after them for
    that step's own (which the step writes in place: nothing is concatenated per step). Once the
    positions reach the end, they move back to the front (every ~window steps) or, with no window,
    into buffers twice as large."""

    def __init__(self, batch: int, width: int, window: int | None, like: Tensor, kept: int = 0) -> None:
        # Room for `kept` positions and one more (window: kept < window).
        capacity = 2 * window if window is not None else max(64, 2 * (kept + 1))
        self.keys = like.new_empty(batch, capacity, width)
        self.values = like.new_empty(batch, capacity, width)
        self.window, self.first, self.count = window, 0, 0

    @property
    def batch(self) -> int:
        return self.keys.shape[0]

    def make_room(self) -> None:
        """Frees slot first + count for the step's own position."""
        capacity = self.keys.shape[1]
        if self.first + self.count < capacity:
            return
        kept = slice(self.first, self.first + self.count)
        keys, values = self.keys[:, kept], self.values[:, kept]
        if self.window is None:
            self.keys = self.keys.new_empty(self.batch, 2 * capacity, self.keys.shape[2])
            self.values = torch.empty_like(self.keys)
        # (With a window, count <= window - 1 < first: the ranges do not overlap.)
        self.keys[:, :self.count], self.values[:, :self.count] = keys, values
        self.first = 0

    def advance(self) -> None:
        """After a step wrote its position at first + count: the positions the next step attends."""
        self.count += 1
        if self.window is not None and self.count > self.window - 1:
            self.first += self.count - (self.window - 1)
            self.count = self.window - 1

    def attended(self) -> tuple[Tensor, Tensor]:
        """(B, count + 1, D) views: the kept positions and the step's own."""
        span = slice(self.first, self.first + self.count + 1)
        return self.keys[:, span], self.values[:, span]

    def as_heads(self, num_heads: int) -> tuple[Tensor | None, Tensor | None]:
        """The kept positions as HybridState holds them, (B, heads, count, head_dim) copies; None for none."""
        if self.count == 0:
            return None, None
        span = slice(self.first, self.first + self.count)

        def heads(t: Tensor) -> Tensor:
            return t[:, span].unflatten(2, (num_heads, -1)).transpose(1, 2).clone(memory_format=torch.contiguous_format)

        return heads(self.keys), heads(self.values)

    @classmethod
    def from_heads(cls, keys: Tensor, values: Tensor, window: int | None) -> _KeptPositions:
        """From a state's (B, heads, P, head_dim) keys and values (copied)."""
        batch, heads, kept, head_dim = keys.shape
        positions = cls(batch, heads * head_dim, window, keys, kept)
        positions.keys[:, :kept] = keys.transpose(1, 2).flatten(2)
        positions.values[:, :kept] = values.transpose(1, 2).flatten(2)
        positions.count = kept
        return positions


class HybridStreamer:
    """:meth:`HybridBlock.streamer`: the recurrent layer's streamer (``module.streamer()``), then the
    attention of the step's position over the window's keys and values, which it keeps (in
    :class:`_KeptPositions`; a float32 block on the CPU runs the attention in C++,
    ``_C.HybridAttentionStep``). Each step gives ``stream``'s numbers for that step (to rounding),
    without autograd. The weights are copies
    made when it was made; steps from several threads are serialised."""

    def __init__(self, block: HybridBlock) -> None:
        self._recurrent = block.recurrent.streamer()  # checks unidirectional

        # Copies: the query, key and value projections stacked into one product per step.
        projections = (block.query, block.key, block.value)
        self._qkv_weight = torch.cat([p.weight.detach() for p in projections])
        self._qkv_bias = None if block.query.bias is None else torch.cat([p.bias.detach() for p in projections])
        self._out_weight = block.out.weight.detach().clone()
        self._out_bias = None if block.out.bias is None else block.out.bias.detach().clone()
        self.num_heads, self.head_dim, self.window = block.num_heads, block.head_dim, block.window
        # A float32 block on the CPU steps in C++ (engine/one_query_attention.h): the same step in
        # torch operations took ~200 us, mostly the cost of a dozen small ops, on a 2-core x86.
        self._kernel = None
        if self._qkv_weight.dtype == torch.float32 and self._qkv_weight.device.type == "cpu":
            self._kernel = _ops.HybridAttentionStep(self._qkv_weight, self._qkv_bias, self._out_weight,
                                                    self._out_bias, self.num_heads, self.head_dim)
        self._kept: _KeptPositions | None = None  # None: no position yet
        self._unbatched = False
        self._lock = threading.Lock()

    def step(self, input: Tensor) -> Tensor:
        """One position: input (B, input_size) or (input_size,) gives (B, width) or (width,)."""
        with self._lock:
            y = self._recurrent.step(input)  # checks the input (refuses one that requires grad in grad mode)
            with torch.no_grad():
                output = self._attend(y)
            self._unbatched = y.dim() == 1
        return output

    def _attend(self, y: Tensor) -> Tensor:
        """The block's output for the recurrent output y (B, W) or (W,) of this position; the kept keys
        and values move on."""
        seq = y if y.dim() == 2 else y.unsqueeze(0)  # (B, W)
        batch = seq.shape[0]
        if self._kept is None or (self._kept.count == 0 and self._kept.batch != batch):
            self._kept = _KeptPositions(batch, self.num_heads * self.head_dim, self.window, seq)
        kept = self._kept
        kept.make_room()
        if self._kernel is not None:
            output = self._kernel.step(seq, kept.keys, kept.values, kept.first, kept.count)
        else:
            # Written for one position rather than through the block's _attend: run through that (three
            # projections, heads as permuted views), a step of bench_hybrid_step.py's LSTM block took
            # ~730 us instead of ~400 on the 2-core EPYC.
            q, k, v = F.linear(seq, self._qkv_weight, self._qkv_bias).chunk(3, 1)
            slot = kept.first + kept.count
            kept.keys[:, slot], kept.values[:, slot] = k, v
            keys, values = (t.unflatten(2, (self.num_heads, self.head_dim)).transpose(1, 2) for t in kept.attended())
            # Every kept position lies inside the window: no mask.
            context = F.scaled_dot_product_attention(q.view(batch, self.num_heads, 1, self.head_dim), keys, values)
            output = seq + F.linear(context.reshape(batch, -1), self._out_weight, self._out_bias)
        kept.advance()
        return output if y.dim() == 2 else output.squeeze(0)

    @property
    def state(self) -> HybridState | None:
        """As ``stream`` returns it (None before the first step): fresh tensors."""
        with self._lock:
            hidden = self._recurrent.state
            if hidden is None:
                return None
            keys, values = (None, None) if self._kept is None else self._kept.as_heads(self.num_heads)
            if keys is not None and values is not None and self._unbatched:
                keys, values = keys.squeeze(0), values.squeeze(0)
            return HybridState(hidden, keys, values)

    def reset(self, state: HybridState | None = None) -> None:
        """Starts a new sequence: from ``state`` (as ``state`` or ``stream`` gives it, copied), or zeros."""
        if state is None:
            with self._lock:
                self._recurrent.reset()
                self._kept = None
            return
        if not isinstance(state, HybridState):
            raise TypeError(f"HybridStreamer.reset: state must be None or a HybridState, got {type(state).__name__}")
        h = state.hidden[0] if isinstance(state.hidden, tuple) else state.hidden
        unbatched = isinstance(h, Tensor) and h.dim() == 2
        keys, values = state.keys, state.values
        if (keys is None) != (values is None):
            raise ValueError("HybridStreamer.reset: state.keys and state.values must both be tensors or both None")
        if keys is not None and values is not None:
            if not isinstance(h, Tensor):
                raise TypeError("HybridStreamer.reset: state.hidden must be the recurrent state (h_n, or (h_n, c_n) "
                                f"for an LSTM) that the keys and values continue, got {type(state.hidden).__name__}")
            batch = 1 if unbatched else h.shape[1]
            given = f"{tuple(keys.shape)} and {tuple(values.shape)}"
            keys, values = (keys.unsqueeze(0), values.unsqueeze(0)) if unbatched else (keys, values)
            if (keys.dim() != 4 or (keys.shape[0], keys.shape[1], keys.shape[3]) != (batch, self.num_heads, self.head_dim)
                    or values.shape != keys.shape):
                raise ValueError(f"HybridStreamer.reset: state.keys and state.values must have shape (batch, "
                                 f"num_heads, P, head_dim) = ({batch}, {self.num_heads}, P, {self.head_dim}) (without "
                                 f"the batch for an unbatched state), got {given}")
            like = self._qkv_weight
            if any(t.dtype != like.dtype or t.device != like.device for t in (keys, values)):
                raise TypeError(f"HybridStreamer.reset: state.keys and state.values must have the block's dtype "
                                f"({like.dtype}) and device ({like.device}), got {keys.dtype} on {keys.device} and "
                                f"{values.dtype} on {values.device}")
            if self.window is not None and keys.shape[2] > self.window - 1:
                raise ValueError(f"HybridStreamer.reset: state.keys holds {keys.shape[2]} positions, more than the "
                                 f"window - 1 = {self.window - 1} a step attends besides its own")
        with self._lock:
            self._recurrent.reset(state.hidden)  # checks and copies it
            self._kept = None
            if keys is not None and values is not None:
                self._kept = _KeptPositions.from_heads(keys.detach(), values.detach(), self.window)
            self._unbatched = unbatched

    @property
    def num_layers(self) -> int:
        return self._recurrent.num_layers

    @property
    def input_size(self) -> int:
        return self._recurrent.input_size

    def __repr__(self) -> str:
        kept = 0 if self._kept is None else self._kept.count
        return (f"rnnattn_ext.HybridStreamer(num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"window={self.window}, positions kept={kept}, recurrent={self._recurrent!r})")
