"""Drop-in replacements for torch.nn.RNN, torch.nn.LSTM and torch.nn.GRU.

Same constructor arguments, parameter names, shapes, initialisation (and so, under the same seed,
the same initial weights) and return values as torch.nn; the work runs in torch.ops.rnnattn.
They are not subclasses of torch.nn.RNNBase on purpose: torch.compile breaks the graph on those.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import NamedTuple, overload

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from . import _ops, functional

_GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
_LAYER_PARTS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
_PROJECTED_LAYER_PARTS = _LAYER_PARTS + ("weight_hr",)


def _parameter_names(layer: int, reverse: bool, parts: tuple[str, ...]) -> tuple[str, ...]:
    """``<part>_l{layer}[_reverse]`` for each part."""
    suffix = f"_l{layer}" + ("_reverse" if reverse else "")
    return tuple(part + suffix for part in parts)


def _detached(layers: list[tuple[Tensor | None, ...]]) -> list[tuple[Tensor | None, ...]]:
    """Each layer's weights without autograd history (a streamer copies them)."""
    return [tuple(None if w is None else w.detach() for w in weights) for weights in layers]


class _LayerCall(NamedTuple):
    """What the C++ layer call (``_C.run_layers``) takes from a module besides the call's arguments:
    fixed by the module's configuration, so worked out once (``RecurrentBase._layer_call``)."""

    widths: tuple[int, ...]  # each state's width
    names: list[tuple[str | None, ...]]  # per layer and direction its parameters in the op's order; None: none
    directions: int


class _Prepared(NamedTuple):
    """A module's input in the ops' terms."""

    x: Tensor  # time-major (T, B, I)
    states: list[Tensor]  # initial states, each (num_layers * D, B, H)
    batched: bool
    lengths: Tensor | None  # (B,) int64 on x's device
    packed: PackedSequence | None  # the PackedSequence input, whose layout the output takes

    @overload
    def packed_order(self, t: Tensor, dim: int) -> Tensor: ...
    @overload
    def packed_order(self, t: None, dim: int) -> None: ...

    def packed_order(self, t: Tensor | None, dim: int) -> Tensor | None:
        """A per-row tensor in the caller's batch order, reordered as x's rows are (longest first for
        PackedSequence input)."""
        order = None if self.packed is None else self.packed.sorted_indices
        return t if t is None or order is None else t.index_select(dim, order.to(t.device))

    def caller_order(self, t: Tensor, dim: int) -> Tensor:
        """The inverse of packed_order."""
        order = None if self.packed is None else self.packed.unsorted_indices
        return t if order is None else t.index_select(dim, order.to(t.device))


def _checked_lengths(owner: str, lengths, steps: int, batch: int, device: torch.device) -> Tensor:
    """lengths as (B,) int64 on the input's device, after checking them as the SPEC asks."""
    if not isinstance(lengths, Tensor):
        try:
            lengths = torch.as_tensor(lengths)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(f"{owner}: lengths must be a 1-D tensor or sequence of ints, got "
                            f"{type(lengths).__name__}") from error
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise TypeError(f"{owner}: lengths must hold integers, got {lengths.dtype}")
    if lengths.dim() > 1 or lengths.numel() != batch:  # a scalar serves an unbatched input
        raise ValueError(f"{owner}: lengths must have shape (B,) = ({batch},), got {tuple(lengths.shape)}")
    lengths = lengths.reshape(-1).to(device=device, dtype=torch.int64)
    # Under torch.compile the values are data the graph must not branch on: the op checks them in C++.
    if lengths.numel() > 0 and not torch.compiler.is_compiling():
        low, high = int(lengths.min()), int(lengths.max())
        if low < 1 or high > steps:
            raise ValueError(f"{owner}: lengths must lie in [1, T] = [1, {steps}], got values in [{low}, {high}]")
    return lengths


class RecurrentBase(nn.Module):
    """Shared machinery of the recurrent modules; ``cell`` names the ops used."""

    def __init__(
        self,
        cell: str,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if not isinstance(dropout, numbers.Number) or not 0 <= dropout <= 1 or isinstance(dropout, bool):
            raise ValueError(f"{name}: dropout must be a number in [0, 1], got {dropout!r}")
        for arg, value in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers),
                           ("proj_size", proj_size)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name}: {arg} must be an int, got {type(value).__name__}")
        if hidden_size <= 0:
            raise ValueError(f"{name}: hidden_size must be greater than zero, got {hidden_size}")
        if num_layers <= 0:
            raise ValueError(f"{name}: num_layers must be greater than zero, got {num_layers}")
        if input_size < 0:
            raise ValueError(f"{name}: input_size must be non-negative, got {input_size}")
        if proj_size < 0:
            raise ValueError(f"{name}: proj_size must be a positive int, or 0 for no projection, got {proj_size}")
        if proj_size >= hidden_size:
            raise ValueError(f"{name}: proj_size must be smaller than hidden_size ({hidden_size}), got {proj_size}")
        if proj_size > 0 and cell != "lstm":
            raise ValueError(f"{name}: proj_size is defined for LSTM cells only, got {proj_size} for {cell!r}")
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                f"{name}: dropout={dropout} has no effect with num_layers=1: dropout is applied between layers",
                stacklevel=3,
            )
        self.cell = cell
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size
        factory = {"device": device, "dtype": dtype}
        self._flat_weights_names: list[str] = []
        self._all_weights: list[list[str]] = []
        for shapes in self._parameter_shapes():
            for param_name, shape in shapes:
                self.register_parameter(param_name, nn.Parameter(torch.empty(shape, **factory)))
            self._flat_weights_names.extend(n for n, _ in shapes)
            self._all_weights.append([n for n, _ in shapes])
        self.reset_parameters()

    def _parameter_shapes(self) -> list[list[tuple[str, tuple[int, ...]]]]:
        """Per layer and direction, in torch.nn's order, each parameter's name and shape."""
        gate_size = _GATES[self.cell] * self.hidden_size
        directions = 2 if self.bidirectional else 1
        result = []
        for layer in range(self.num_layers):
            layer_input = self.input_size if layer == 0 else self.state_size * directions
            for direction in range(directions):
                suffix = "_reverse" if direction == 1 else ""
                shapes: list[tuple[str, tuple[int, ...]]] = [
                    (f"weight_ih_l{layer}{suffix}", (gate_size, layer_input)),
                    (f"weight_hh_l{layer}{suffix}", (gate_size, self.state_size)),
                ]
                if self.bias:
                    shapes += [
                        (f"bias_ih_l{layer}{suffix}", (gate_size,)),
                        (f"bias_hh_l{layer}{suffix}", (gate_size,)),
                    ]
                if self.proj_size > 0:
                    shapes.append((f"weight_hr_l{layer}{suffix}", (self.proj_size, self.hidden_size)))
                result.append(shapes + self._extra_parameter_shapes(layer, suffix))
        return result

    def _parameter_fault(self, input, error_type: type[Exception]) -> Exception | None:
        """An op names the argument it rejects (``weight_hh``), not the parameter it came from: after
        an error, the parameter that does not fit the module (shape) or the input (dtype outside
        autocast, device), named, as an error_type; the input, when every parameter has one dtype or
        device and the input another; None if everything fits."""
        like = input.data if isinstance(input, PackedSequence) else input
        if not isinstance(like, Tensor):
            return None
        owner = type(self).__name__
        named = [(name, shape, getattr(self, name, None)) for shapes in self._parameter_shapes()
                 for name, shape in shapes]
        for name, shape, value in named:
            if not isinstance(value, Tensor):
                return error_type(f"{owner}: parameter {name} must be a Tensor, got {type(value).__name__}")
            if tuple(value.shape) != shape:
                return error_type(f"{owner}: parameter {name} must have shape {shape}, got {tuple(value.shape)}")
        checks: list[tuple[str, object]] = [("device", like.device)]
        if like.is_floating_point() and not torch.is_autocast_enabled(like.device.type):
            checks.append(("dtype", like.dtype))
        for attribute, wanted in checks:
            odd = [(name, getattr(value, attribute)) for name, _, value in named if getattr(value, attribute) != wanted]
            if odd and len(odd) < len(named):
                name, got = odd[0]
                return error_type(f"{owner}: parameter {name} must have the input's {attribute} ({wanted}), got {got}")
            if odd and len({got for _, got in odd}) == 1:
                return error_type(f"{owner}: input must have the parameters' {attribute} ({odd[0][1]}), got {wanted}")
        return None

    @property
    def state_size(self) -> int:
        """Width of h and of the output per direction: proj_size with a projection, else hidden_size."""
        return self.proj_size if self.proj_size > 0 else self.hidden_size

    def _extra_parameter_shapes(self, layer: int, suffix: str) -> list[tuple[str, tuple[int, ...]]]:
        """Parameters a subclass adds after the base cell's, per layer and direction."""
        return []

    def _init_bound(self, name: str) -> float:
        return 1.0 / math.sqrt(self.hidden_size)

    def reset_parameters(self) -> None:
        # torch.nn's initialisation, in torch.nn's parameter order.
        for name, weight in self.named_parameters():
            bound = self._init_bound(name)
            nn.init.uniform_(weight, -bound, bound)

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    @property
    def mode(self) -> str:
        """torch.nn's name of the cell: 'LSTM', 'GRU', 'RNN_TANH' or 'RNN_RELU'."""
        return self.cell.upper()

    @property
    def _flat_weights(self) -> list[Tensor | None]:
        """Every parameter in torch.nn's flat order (``_flat_weights_names``), as torch.nn's modules list them."""
        return [getattr(self, name, None) for name in self._flat_weights_names]

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every submodule before it compiles anything: a clear error
        # here instead of TorchScript's complaint about some line of Python it cannot compile.
        raise RuntimeError(f"{type(self).__name__} cannot be compiled by torch.jit.script (its forward is Python "
                           "that TorchScript does not support); torch.jit.trace, torch.compile and torch.export "
                           "all take it")

    def flatten_parameters(self) -> None:
        """Kept for code written against torch.nn (which calls it before cuDNN runs): nothing to do here,
        the ops read every weight where it is, on every device, so there is no flat buffer to rebuild."""

    # torch.nn.RNNBase's argument checks, for code written against it (a subclass whose forward calls
    # them as torch.nn's own does): the same checks, results and exceptions. forward does not use
    # them: its own checks name the module and the argument.
    def check_input(self, input: Tensor, batch_sizes: Tensor | None) -> None:
        """As torch.nn's: ``input`` has the weights' dtype (unless autocast is on), 2 dimensions with
        ``batch_sizes`` (a PackedSequence's data) or 3 without, and ``input_size`` features."""
        weight_dtype = self.weight_ih_l0.dtype
        if input.dtype != weight_dtype and not torch._C._is_any_autocast_enabled():
            raise ValueError(f"RNN input dtype ({input.dtype}) does not match weight dtype ({weight_dtype}). "
                             f"Convert input: input.to({weight_dtype}), or convert model: model.to({input.dtype})")
        expected_dim = 2 if batch_sizes is not None else 3
        if input.dim() != expected_dim:
            raise RuntimeError(f"input must have {expected_dim} dimensions, got {input.dim()}")
        if input.size(-1) != self.input_size:
            raise RuntimeError(f"input.size(-1) must be equal to input_size. Expected {self.input_size}, "
                               f"got {input.size(-1)}")

    def get_expected_hidden_size(self, input: Tensor, batch_sizes: Tensor | None) -> tuple[int, int, int]:
        """As torch.nn's: (num_layers * directions, batch, width of h) for this input."""
        if batch_sizes is not None:
            batch = int(batch_sizes[0])
        else:
            batch = input.size(0) if self.batch_first else input.size(1)
        return (self.num_layers * (2 if self.bidirectional else 1), batch, self.state_size)

    def check_hidden_size(self, hx: Tensor, expected_hidden_size: tuple[int, int, int],
                          msg: str = "Expected hidden size {}, got {}") -> None:
        if hx.size() != expected_hidden_size:
            raise RuntimeError(msg.format(expected_hidden_size, list(hx.size())))

    def get_expected_cell_size(self, input: Tensor, batch_sizes: Tensor | None) -> tuple[int, int, int]:
        """As torch.nn.LSTM's: (num_layers * directions, batch, hidden_size), the shape of c (the LSTM
        cells')."""
        layers, batch, _ = self.get_expected_hidden_size(input, batch_sizes)
        return (layers, batch, self.hidden_size)

    def check_forward_args(self, input: Tensor, hidden: Tensor | tuple[Tensor, Tensor],
                           batch_sizes: Tensor | None) -> None:
        """As torch.nn's: the input, then h (the LSTM cells': hidden = (h, c), both checked)."""
        self.check_input(input, batch_sizes)
        expected = self.get_expected_hidden_size(input, batch_sizes)
        if self._num_states() == 1:
            self.check_hidden_size(hidden, expected)  # type: ignore[arg-type]
        else:
            self.check_hidden_size(hidden[0], expected, "Expected hidden[0] size {}, got {}")
            self.check_hidden_size(hidden[1], self.get_expected_cell_size(input, batch_sizes),
                                   "Expected hidden[1] size {}, got {}")

    @overload
    def permute_hidden(self, hx: Tensor, permutation: Tensor | None) -> Tensor: ...

    @overload
    def permute_hidden(self, hx: tuple[Tensor, Tensor], permutation: Tensor | None) -> tuple[Tensor, Tensor]: ...

    def permute_hidden(self, hx, permutation):
        """``hx`` (h; the LSTM cells': (h, c)) with its batch rows (dimension 1) in ``permutation``'s
        order (a PackedSequence's sorted or unsorted indices), or as it is for None."""
        if permutation is None:
            return hx
        if self._num_states() == 1:
            return hx.index_select(1, permutation)
        return hx[0].index_select(1, permutation), hx[1].index_select(1, permutation)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.proj_size != 0:
            s += f", proj_size={self.proj_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if self.bias is not True:
            s += f", bias={self.bias}"
        if self.batch_first is not False:
            s += f", batch_first={self.batch_first}"
        if self.dropout != 0:
            s += f", dropout={self.dropout}"
        if self.bidirectional is not False:
            s += f", bidirectional={self.bidirectional}"
        return s

    def _weights_of(self, index: int, parts: tuple[str, ...]) -> tuple[Tensor | None, ...]:
        """The parameters ``<part>_l{layer}[_reverse]`` of layer and direction ``index`` (None for an
        absent one: no bias, no projection)."""
        directions = 2 if self.bidirectional else 1
        names = _parameter_names(index // directions, index % directions == 1, parts)
        # Straight from the parameter dict (nn.Module.__getattr__ is slow); getattr for anything
        # else, such as a parametrized weight.
        parameters = self._parameters
        return tuple([parameters[name] if name in parameters else getattr(self, name, None) for name in names])

    def _layer_parts(self) -> tuple[str, ...]:
        """The parameters of one layer and direction, in the order functional.stack takes them."""
        return _PROJECTED_LAYER_PARTS if self.proj_size > 0 else _LAYER_PARTS

    def _layer_weights(self) -> list[tuple[Tensor | None, ...]]:
        """Per layer and direction (w_ih, w_hh, b_ih, b_hh[, w_hr]), as functional.stack takes them."""
        parts = self._layer_parts()
        return [self._weights_of(index, parts) for index in range(len(self._all_weights))]

    def _op_parts(self) -> tuple[str, ...]:
        """One layer's parameters in the forward op's argument order."""
        return self._layer_parts()

    def _layer_call(self) -> _LayerCall:
        """The module's _LayerCall, made on first use (it depends on the configuration only)."""
        call = self.__dict__.get("_layer_call_made")
        if call is None:
            present = set(self._flat_weights_names)
            directions = 2 if self.bidirectional else 1
            names = [tuple(name if name in present else None
                           for name in _parameter_names(layer, direction == 1, self._op_parts()))
                     for layer in range(self.num_layers) for direction in range(directions)]
            call = _LayerCall(self._state_widths(), names, directions)
            self.__dict__["_layer_call_made"] = call  # a plain attribute, not a submodule or parameter
        return call

    def _num_states(self) -> int:
        return 2 if self.cell == "lstm" else 1

    def _state_widths(self) -> tuple[int, ...]:
        """Width of each state: h is state_size wide (proj_size with a projection), c hidden_size."""
        return (self.state_size, self.hidden_size)[: self._num_states()]

    def _raise_parameter_fault(self, error: Exception, input) -> None:
        """After `error`, the error naming the parameter that does not fit (_parameter_fault), raised
        from it as the builtin class of `error` (TypeError, ValueError, else RuntimeError); nothing if
        there is none (the caller then re-raises `error` as it was)."""
        kind = (TypeError if isinstance(error, TypeError)
                else ValueError if isinstance(error, ValueError) else RuntimeError)
        fault = self._parameter_fault(input, kind)
        if fault is not None:
            raise fault from error

    def _run(self, input: Tensor | PackedSequence, hx: Tensor | tuple[Tensor, ...] | None, lengths=None):
        try:  # free until something fails
            result: tuple[Tensor | PackedSequence, list[Tensor]] | None
            if type(input) is Tensor:
                result = self._run_layers(input, hx, lengths)
            elif type(input) is PackedSequence and lengths is None:
                result = self._run_packed_layers(input, hx)
            else:
                result = None
            if result is not None:
                return result
            return self._run_general(input, hx, lengths)
        except (TypeError, ValueError, RuntimeError) as error:
            self._raise_parameter_fault(error, input)
            raise

    def _run_general(self, input: Tensor | PackedSequence, hx: Tensor | tuple[Tensor, ...] | None, lengths=None):
        prepared = self._prepare(input, hx, lengths)
        output, finals = functional.stack(
            self.cell,
            prepared.x,
            prepared.states,
            self._layer_weights(),
            self.num_layers,
            self.bidirectional,
            dropout=self.dropout,
            training=self.training,
            lengths=prepared.lengths,
        )
        return self._finish(output, finals, prepared)

    def _run_layers(self, input: Tensor, hx, lengths) -> tuple[Tensor, list[Tensor]] | None:
        """The common case of a batched tensor, a well-formed ``hx`` and lengths None or a CPU int64
        tensor of the right shape and values, in C++ (``_C.run_layers``: the same op layer by layer
        and direction by direction, with the same dropout between layers, without the Python around
        it, which costs a streaming step about as much as the op and a bidirectional or
        variable-length call ~150-250 µs). None for anything else, which the general path takes, and
        where bad arguments get their errors; also while Dynamo traces, as it cannot see into that
        call, and in forward mode (``functional.layer`` runs it)."""
        if torch.compiler.is_compiling() or functional.in_forward_mode():
            return None
        call = self._layer_call()
        return _ops.run_layers(self.cell, input, hx, self.input_size, call.widths, self.batch_first, self, call.names,
                               call.directions, lengths, self._dropout_between_layers())

    def _dropout_between_layers(self) -> float:
        """The dropout probability between layers this call applies (functional.stack's rule)."""
        return float(self.dropout) if self.training and self.num_layers > 1 else 0.0

    def _run_packed_layers(self, packed: PackedSequence, hx) -> tuple[PackedSequence, list[Tensor]] | None:
        """``_run_layers`` for a PackedSequence on the CPU, which the C++ call pads and packs again
        itself, taking hx and giving the final states in the caller's batch order as the general
        path does. None where that path must take it."""
        if torch.compiler.is_compiling() or functional.in_forward_mode():
            return None
        call = self._layer_call()
        result = _ops.run_layers(self.cell, packed, hx, self.input_size, call.widths, False, self, call.names,
                                 call.directions, None, self._dropout_between_layers())
        if result is None:
            return None
        data, finals = result
        return PackedSequence(data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices), finals

    def _prepare(self, input: Tensor | PackedSequence, hx: Tensor | tuple[Tensor, ...] | None,
                 lengths=None) -> _Prepared:
        """Checks input, hx and lengths; a PackedSequence becomes a padded time-major batch in its
        packed order (see _Prepared.packed_order), with its lengths."""
        name = type(self).__name__
        packed = None
        if isinstance(input, PackedSequence):
            if lengths is not None:
                raise ValueError(f"{name}: lengths must be None for PackedSequence input (it carries its own)")
            packed = input
            # Padded in the packed order (longest first): the engine's recurrent GEMMs then shrink to
            # the rows still running. States and results are reordered to match.
            input, lengths = torch.ops.aten._pad_packed_sequence(packed.data, packed.batch_sizes, False, 0.0,
                                                                 packed.batch_sizes.numel())
        if not isinstance(input, Tensor):
            raise TypeError(f"{name}: input must be a Tensor, got {type(input).__name__}")
        if input.dim() not in (2, 3):
            raise ValueError(f"{name}: expected input to be 2-D (unbatched) or 3-D (batched), got {input.dim()}-D "
                             f"tensor of shape {tuple(input.shape)}")
        if input.shape[-1] != self.input_size:
            raise ValueError(f"{name}: input.size(-1) must be equal to input_size. Expected {self.input_size}, "
                             f"got {input.shape[-1]}")
        batched = input.dim() == 3
        directions = 2 if self.bidirectional else 1
        num_states = self._num_states()
        if not batched:
            x = input.unsqueeze(1)
        elif self.batch_first and packed is None:
            x = input.transpose(0, 1)
        else:
            x = input
        if x.shape[0] == 0:
            raise ValueError(f"{name}: input must have at least one time step (T >= 1, as torch.nn), got input of "
                             f"shape {tuple(input.shape)}")
        batch = x.shape[1]
        shapes = [(self.num_layers * directions, batch, width) for width in self._state_widths()]
        if hx is None:
            states = [x.new_zeros(shape) for shape in shapes]
        else:
            given = list(hx) if isinstance(hx, (tuple, list)) else [hx]
            if num_states == 2 and (not isinstance(hx, (tuple, list)) or len(given) != 2):
                raise TypeError(f"{name}: hx must be a tuple (h_0, c_0), got {type(hx).__name__}")
            if num_states == 1 and isinstance(hx, (tuple, list)):
                raise TypeError(f"{name}: hx must be a Tensor, got {type(hx).__name__}")
            states = []
            for state_name, state, expected in zip(("h_0", "c_0"), given, shapes):
                if not isinstance(state, Tensor):
                    raise TypeError(f"{name}: {state_name} must be a Tensor, got {type(state).__name__}")
                wanted_dim = 3 if batched else 2
                if state.dim() != wanted_dim:
                    raise ValueError(
                        f"{name}: for {'batched' if batched else 'unbatched'} {input.dim()}-D input, {state_name} "
                        f"should also be {wanted_dim}-D but got {state.dim()}-D tensor"
                    )
                if not batched:
                    state = state.unsqueeze(1)
                if tuple(state.shape) != expected:
                    shown = expected if batched else (expected[0], expected[2])
                    got = tuple(state.shape) if batched else (state.shape[0], state.shape[2])
                    raise ValueError(f"{name}: expected {state_name} of size {shown}, got {got}")
                states.append(state)
        if lengths is not None:
            lengths = _checked_lengths(name, lengths, x.shape[0], batch, x.device)
        prepared = _Prepared(x, states, batched, lengths, packed)
        return prepared._replace(states=[prepared.packed_order(s, 1) for s in states])

    def _check_unidirectional(self, method: str) -> None:
        if self.bidirectional:
            raise ValueError(f"{type(self).__name__}: {method} needs a unidirectional module (the reverse direction "
                             "reads the whole sequence), got bidirectional=True")

    def _check_streamable(self, input) -> None:
        self._check_unidirectional("stream")
        if isinstance(input, PackedSequence):
            raise TypeError(f"{type(self).__name__}: stream takes a tensor chunk, got a PackedSequence")

    def stream(self, input: Tensor, state=None):
        """Runs one chunk of a sequence (one step or more) and returns ``(output, state)``; feeding the
        returned state to the next call continues the sequence: chunk by chunk gives the outputs of
        one call over the whole sequence. ``state`` is what ``forward`` takes as ``hx`` (None: zeros).
        Unidirectional modules only."""
        self._check_streamable(input)
        return self(input, state)

    def streamer(self) -> _ops.Streamer:
        """A :class:`rnnattn_ext.Streamer` for streaming inference at the lowest cost per step: ``step(x_t)``
        takes one time step, (B, input_size) or (input_size,) as torch.nn's cells, returns the last
        layer's output and keeps the state inside (``state``, ``reset(state=None)``). Each step gives
        the numbers of ``stream`` over that step in eval mode (no dropout), without autograd; autocast
        does not apply to it (it computes in the module's dtype, as it was when the streamer was made).

        It holds a snapshot of the weights: copies made now, which nothing later done to this module
        changes (an optimizer step, ``load_state_dict``, ``.to()``): make a new streamer after those.
        Unidirectional modules only; it runs outside torch.compile, torch.export and jit.trace
        (their graphs take ``stream`` or ``forward``)."""
        self._check_unidirectional("streamer")
        return _ops.Streamer(self.cell, _detached(self._layer_weights()), self.input_size, list(self._state_widths()))

    def _finish(self, output: Tensor, finals: list[Tensor], prepared: _Prepared):
        """The time-major output and final states in the caller's layout (a PackedSequence for one)."""
        if prepared.packed is not None:
            like, lengths = prepared.packed, prepared.lengths
            assert lengths is not None  # _prepare takes a PackedSequence's lengths from it
            data, _ = torch.ops.aten._pack_padded_sequence(output, lengths.cpu(), False)
            finals = [prepared.caller_order(f, 1) for f in finals]
            return PackedSequence(data, like.batch_sizes, like.sorted_indices, like.unsorted_indices), finals
        if not prepared.batched:
            output = output.squeeze(1)
            finals = [f.squeeze(1) for f in finals]
        elif self.batch_first:
            output = output.transpose(0, 1)
        return output, finals


class LSTM(RecurrentBase):
    """Drop-in for :class:`torch.nn.LSTM`: returns ``output, (h_n, c_n)``. With ``proj_size`` P > 0
    (as torch.nn) h_t = W_hr (o_t * tanh(c_t)): the output and h are P wide (``weight_hr_l{k}``)."""

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, proj_size=0, device=None, dtype=None):
        super().__init__("lstm", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         proj_size, device, dtype)

    def forward(self, input: Tensor | PackedSequence, hx: tuple[Tensor, Tensor] | None = None, lengths=None):
        """As torch.nn.LSTM (PackedSequence in, PackedSequence out). ``lengths`` (B,) ints in [1, T]
        (batched tensor input only): row b stops after step lengths[b], its later outputs are zero and
        its final states those after its last valid step, as if the batch had been packed."""
        output, (h_n, c_n) = self._run(input, hx, lengths)
        return output, (h_n, c_n)


class GRU(RecurrentBase):
    """Drop-in for :class:`torch.nn.GRU`: returns ``output, h_n``."""

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, device=None, dtype=None):
        super().__init__("gru", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         0, device, dtype)

    def forward(self, input: Tensor | PackedSequence, hx: Tensor | None = None, lengths=None):
        """As torch.nn's; ``lengths`` as in :meth:`LSTM.forward`."""
        output, (h_n,) = self._run(input, hx, lengths)
        return output, h_n


class RNN(RecurrentBase):
    """Drop-in for :class:`torch.nn.RNN` (``nonlinearity`` 'tanh' or 'relu'): returns ``output, h_n``."""

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, device=None, dtype=None):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"RNN: nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        super().__init__(f"rnn_{nonlinearity}", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, 0, device, dtype)
        self.nonlinearity = nonlinearity

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s if self.nonlinearity == "tanh" else s + f", nonlinearity={self.nonlinearity!r}"

    def forward(self, input: Tensor | PackedSequence, hx: Tensor | None = None, lengths=None):
        """As torch.nn's; ``lengths`` as in :meth:`LSTM.forward`."""
        output, (h_n,) = self._run(input, hx, lengths)
        return output, h_n
