"""HybridBlock: a recurrent layer followed by causal multi-head self-attention with a residual.

SPEC "Hybrid block": y = RNN(x); h'_t = y_t + W_o · MHA(W_q y, W_k y, W_v y)_t, the attention causal
and optionally windowed. The attention runs over the whole sequence at once through
``torch.nn.functional.scaled_dot_product_attention``; only the recurrence is sequential.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .modules import GRU, LSTM, RNN

_RECURRENT = {"lstm": LSTM, "gru": GRU, "rnn_tanh": RNN, "rnn_relu": RNN}


def causal_window_mask(steps: int, window: int | None, device=None) -> Tensor | None:
    """Boolean (T, T) mask, True where query t may attend key s: s <= t and, with a window w,
    s > t - w (the w most recent positions, t itself included). None means plain causal."""
    if window is None:
        return None
    t = torch.arange(steps, device=device)
    offset = t.unsqueeze(1) - t.unsqueeze(0)  # t - s
    return (offset >= 0) & (offset < window)


class HybridBlock(nn.Module):
    """Recurrent layer (``cell``: "lstm", "gru", "rnn_tanh", "rnn_relu") + causal windowed self-attention.

    Arguments of the recurrent layer as in torch.nn (``num_layers``, ``bias``, ``batch_first``,
    ``dropout``, ``bidirectional``); ``num_heads`` and ``head_dim`` give the attention width
    D = num_heads * head_dim (default head_dim: the recurrent output width / num_heads);
    ``window``: how many most recent positions (itself included) each position attends, None for all.

    ``forward(input, hx=None)`` returns ``(output, hidden)``: output has the recurrent layer's output
    shape, hidden is the recurrent layer's final state (``(h_n, c_n)`` for an LSTM).
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

    def forward(self, input: Tensor, hx=None, lengths=None):
        """``output, hidden``: output (T, B, W) in the input's layout, hidden as the recurrent module's.
        ``lengths`` (B,) ints in [1, T]: each row as if run alone over its first lengths[b] steps
        (causal attention reads no later step), zeros after them."""
        batched = input.dim() == 3
        x = input
        if batched and self.batch_first:
            x = x.transpose(0, 1)
        y, hidden = self.recurrent(x, hx, lengths=lengths)  # time-major (T, B, W) or unbatched (T, W)
        seq = y if batched else y.unsqueeze(1)
        steps, batch, _ = seq.shape

        def heads(t: Tensor) -> Tensor:  # (T, B, D) -> (B, heads, T, head_dim)
            return t.view(steps, batch, self.num_heads, self.head_dim).permute(1, 2, 0, 3)

        q, k, v = heads(self.query(seq)), heads(self.key(seq)), heads(self.value(seq))
        mask = causal_window_mask(steps, self.window, seq.device)
        if mask is None:
            attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        context = attended.permute(2, 0, 1, 3).reshape(steps, batch, self.num_heads * self.head_dim)
        output = seq + self.out(context)
        if lengths is not None:  # checked by the recurrent module
            valid = torch.as_tensor(lengths, device=output.device).reshape(1, -1, 1)
            output = output.masked_fill(torch.arange(steps, device=output.device).view(-1, 1, 1) >= valid, 0)
        if not batched:
            output = output.squeeze(1)
        elif self.batch_first:
            output = output.transpose(0, 1)
        return output, hidden
