"""Drop-in replacements for torch.nn.RNNCell, torch.nn.LSTMCell and torch.nn.GRUCell: one step.

Same constructor arguments, parameter names (``weight_ih``, ``weight_hh``, ``bias_ih``,
``bias_hh``), shapes, initialisation (the same initial weights under the same seed), inputs
(batched (B, I) or unbatched (I,)) and results as torch.nn's cells. A step is one call of the
layer's op (``functional.layer`` with T = 1): forward, backward and every dtype and device as the
layers have them, for code that writes its own time loop (a decoder with custom logic between
steps, beam search, a policy). Streaming inference of a whole module is faster still through its
``streamer()``, which keeps its state and checked weights between steps.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import functional
from .modules import _GATES


class CellBase(nn.Module):
    """Shared machinery of the cells; ``cell`` names the op they run (functional.layer's ``cell``)."""

    def __init__(self, cell: str, input_size: int, hidden_size: int, bias: bool = True, device=None,
                 dtype=None) -> None:
        super().__init__()
        name = type(self).__name__
        for arg, value in (("input_size", input_size), ("hidden_size", hidden_size)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name}: {arg} must be an int, got {type(value).__name__}")
        if hidden_size <= 0:
            raise ValueError(f"{name}: hidden_size must be greater than zero, got {hidden_size}")
        if input_size < 0:
            raise ValueError(f"{name}: input_size must be non-negative, got {input_size}")
        self.cell = cell
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        factory = {"device": device, "dtype": dtype}
        rows = _GATES[cell] * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(rows, input_size, **factory))
        self.weight_hh = nn.Parameter(torch.empty(rows, hidden_size, **factory))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(rows, **factory))
            self.bias_hh = nn.Parameter(torch.empty(rows, **factory))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """As torch.nn's cells: every parameter uniform in +-1/sqrt(hidden_size), in registration order."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.bias is not True:
            s += f", bias={self.bias}"
        return s

    def _num_states(self) -> int:
        return 2 if self.cell == "lstm" else 1

    def _step(self, input: Tensor, hx: Tensor | tuple[Tensor, ...] | list[Tensor] | None) -> list[Tensor]:
        """Checks the arguments, runs one step and returns the new states (h, or h and c), unbatched
        when the input is."""
        name = type(self).__name__
        if not isinstance(input, Tensor):
            raise TypeError(f"{name}: input must be a Tensor, got {type(input).__name__}")
        if input.dim() not in (1, 2):
            raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if input.shape[-1] != self.input_size:
            raise ValueError(f"{name}: input.size(-1) must be equal to input_size. Expected {self.input_size}, "
                             f"got {input.shape[-1]}")
        if input.dtype != self.weight_ih.dtype and not torch.is_autocast_enabled(input.device.type):
            raise TypeError(f"{name}: input must have the parameters' dtype ({self.weight_ih.dtype}), got "
                            f"{input.dtype}")
        batched = input.dim() == 2
        x = input if batched else input.unsqueeze(0)
        shape = (x.shape[0], self.hidden_size)
        if hx is None:
            states = [x.new_zeros(shape) for _ in range(self._num_states())]
        else:
            if self._num_states() == 2:
                if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                    raise TypeError(f"{name}: hx must be a tuple (h_0, c_0), got {type(hx).__name__}")
                given = list(hx)
                labels = ["hx[0]", "hx[1]"]
            else:
                if not isinstance(hx, Tensor):
                    raise TypeError(f"{name}: hx must be a Tensor, got {type(hx).__name__}")
                given, labels = [hx], ["hx"]
            states = []
            for label, state in zip(labels, given):
                if not isinstance(state, Tensor):
                    raise TypeError(f"{name}: {label} must be a Tensor, got {type(state).__name__}")
                if state.dim() != input.dim():
                    raise ValueError(f"{name}: {label} must be {input.dim()}-D as the input is, got "
                                     f"{state.dim()}-D of shape {tuple(state.shape)}")
                state = state if batched else state.unsqueeze(0)
                if tuple(state.shape) != shape:
                    wanted = shape if batched else shape[1:]
                    got = tuple(state.shape) if batched else tuple(state.shape[1:])
                    raise ValueError(f"{name}: {label} must have shape {wanted}, got {got}")
                states.append(state)
        _, finals = functional.layer(self.cell, x.unsqueeze(0), states, self.weight_ih, self.weight_hh, self.bias_ih,
                                     self.bias_hh)
        return finals if batched else [s.squeeze(0) for s in finals]


class LSTMCell(CellBase):
    """Drop-in for :class:`torch.nn.LSTMCell`: ``forward(input, hx=None)`` returns ``(h_1, c_1)``."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__("lstm", input_size, hidden_size, bias, device, dtype)

    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        h, c = self._step(input, hx)
        return h, c


class GRUCell(CellBase):
    """Drop-in for :class:`torch.nn.GRUCell`: ``forward(input, hx=None)`` returns ``h_1``."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__("gru", input_size, hidden_size, bias, device, dtype)

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        return self._step(input, hx)[0]


class RNNCell(CellBase):
    """Drop-in for :class:`torch.nn.RNNCell` (``nonlinearity`` 'tanh' or 'relu'): ``forward(input,
    hx=None)`` returns ``h_1``."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, nonlinearity: str = "tanh",
                 device=None, dtype=None) -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"RNNCell: nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        super().__init__(f"rnn_{nonlinearity}", input_size, hidden_size, bias, device, dtype)
        self.nonlinearity = nonlinearity

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s if self.nonlinearity == "tanh" else s + f", nonlinearity={self.nonlinearity}"

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        return self._step(input, hx)[0]
