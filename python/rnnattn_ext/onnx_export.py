"""ONNX export of the recurrent layers. Each base op (``torch.ops.rnnattn.<cell>_forward``, one layer and
direction) becomes ONNX's own LSTM, GRU or RNN operator, so an exported model runs in any ONNX runtime
without this library, for any number of steps. What ONNX has no operator for, the attention-augmented
cells and the LSTM projection, ``export`` first decomposes into plain torch operations over a time
loop (``unrolled``): unrolled for a static number of steps (one step per call for streaming, for
example), ONNX's Scan operator for a dynamic one.

    onnx_program = rnnattn_ext.onnx_export.export(model, (x,), dynamic_shapes=...)
    # base layers only, with torch.onnx.export's own call:
    torch.onnx.export(model, (x,), dynamo=True, custom_translation_table=rnnattn_ext.onnx_export.translation_table())

Needs the ``onnxscript`` package (``pip install onnxscript``; torch's exporter needs it too).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from . import _ops, unrolled

# Gate order of torch.nn (SPEC) -> ONNX's: LSTM i f g o -> i o f c; GRU r z n -> z r h.
_ONNX_GATE_ORDER = {"lstm": (0, 3, 1, 2), "gru": (1, 0, 2), "rnn_tanh": (0,), "rnn_relu": (0,)}
_ONNX_OPERATOR = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN", "rnn_relu": "RNN"}
_INT32 = 6  # onnx.TensorProto.INT32: ONNX's sequence_lens type
_FLOAT, _BFLOAT16 = 1, 16  # onnx.TensorProto.FLOAT, BFLOAT16


class UnsupportedForOnnx(ValueError):
    """What the export cannot express (raised while translating or decomposing; ``export`` raises it
    itself instead of the exporter's error around it)."""


_USE_EXPORT = "rnnattn_ext.onnx_export.export, which decomposes it into a time loop of operators ONNX has"


def _onnx_opset():
    try:
        from onnxscript import opset18
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("rnnattn_ext.onnx_export needs the onnxscript package (pip install onnxscript), "
                          "which torch.onnx.export's exporter also needs") from error
    return opset18


def _base_translation(cell: str) -> Callable[..., Any]:
    """The translation of ``rnnattn::<cell>_forward`` (one layer and direction of time-major input): the
    exporter passes the op's arguments in schema order; it returns the op's outputs (output, finals,
    workspace). ``reverse`` and ``training`` are annotated so that they come as Python values."""
    op = _onnx_opset()
    order = _ONNX_GATE_ORDER[cell]
    gates = len(order)

    def in_onnx_gate_order(rows):
        # The G blocks of H rows of a weight (G*H, K) or bias (G*H), reordered: a Gather the exporter's
        # constant folding applies to the stored parameters, so the graph keeps no reordering.
        if gates == 1:
            return rows
        blocks = op.Reshape(rows, op.Constant(value_ints=[gates, -1]))
        picked = op.Gather(blocks, op.Constant(value_ints=list(order)), axis=0)
        return op.Reshape(picked, op.Shape(rows))

    def translate(input, h0, c0=None, weight_ih=None, weight_hh=None, bias_ih=None, bias_hh=None, weight_hr=None,
                  lengths=None, reverse: bool = False, training: bool = False):
        if weight_hr is not None:
            raise UnsupportedForOnnx(
                f"rnnattn_ext ONNX export: an LSTM with a projection (proj_size > 0, weight_hr of shape "
                f"{tuple(weight_hr.shape)}) has no ONNX operator (ONNX's LSTM has no projection): export it with "
                f"{_USE_EXPORT}")
        hidden = int(weight_hh.shape[0]) // gates
        # ONNX's LSTM, GRU and RNN take float16, float and double only: a bfloat16 layer runs in float
        # between casts (the SPEC's compute type for reduced precision), its results rounded back.
        like = input
        widened = getattr(getattr(input, "dtype", None), "name", None) == "BFLOAT16"
        if widened:
            input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh = (
                None if v is None else op.Cast(v, to=_FLOAT)
                for v in (input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh))
        weights = op.Unsqueeze(in_onnx_gate_order(weight_ih), [0])
        recurrent = op.Unsqueeze(in_onnx_gate_order(weight_hh), [0])
        bias = None
        if bias_ih is not None or bias_hh is not None:
            # ONNX takes both halves or none: an absent one is zeros.
            present = bias_ih if bias_ih is not None else bias_hh
            zeros = op.ConstantOfShape(op.Shape(present))
            halves = [in_onnx_gate_order(b) if b is not None else op.CastLike(zeros, present)
                      for b in (bias_ih, bias_hh)]
            bias = op.Unsqueeze(op.Concat(*halves, axis=0), [0])
        sequence_lens = op.Cast(lengths, to=_INT32) if lengths is not None else None
        attributes: dict[str, Any] = {"hidden_size": hidden, "direction": "reverse" if reverse else "forward"}
        if cell == "gru":
            attributes["linear_before_reset"] = 1  # torch's n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
        elif cell != "lstm":
            attributes["activations"] = ["Tanh" if cell == "rnn_tanh" else "Relu"]
        initial = [op.Unsqueeze(h0, [0])] + ([op.Unsqueeze(c0, [0])] if cell == "lstm" else [])
        results = getattr(op, _ONNX_OPERATOR[cell])(input, weights, recurrent, bias, sequence_lens, *initial,
                                                    **attributes)
        output = op.Squeeze(results[0], [1])  # (T, directions=1, B, H) -> (T, B, H)
        finals = [op.Squeeze(r, [0]) for r in results[1:]]
        if widened:
            output, *finals = (op.Cast(v, to=_BFLOAT16) for v in (output, *finals))
        workspace = op.CastLike(op.Constant(value_floats=[]), like)  # what only backward reads: nothing
        return (output, *finals, workspace)

    if cell == "lstm":
        return translate

    def single_state(input, h0, weight_ih, weight_hh, bias_ih=None, bias_hh=None, lengths=None,
                     reverse: bool = False, training: bool = False):
        return translate(input, h0, None, weight_ih, weight_hh, bias_ih, bias_hh, None, lengths, reverse, training)

    return single_state


def _attention_translation(cell: str) -> Callable[..., Any]:
    """The attention-augmented cell has no ONNX operator: ``export`` decomposes it before translating,
    and a translation reached without that says what to call."""

    def refuse(*args, **kwargs):
        raise UnsupportedForOnnx(
            f"rnnattn_ext ONNX export: the attention-augmented {cell} cell (rnnattn::{cell}_attn_forward) has no "
            f"ONNX operator: export it with {_USE_EXPORT}")

    return refuse


def translation_table() -> dict[Any, Callable[..., Any]]:
    """``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)``: every rnnattn forward op."""
    table: dict[Any, Callable[..., Any]] = {}
    for cell in _ops.CELLS:
        table[_ops.forward_op(cell)] = _base_translation(cell)
        table[_ops.attention_forward_op(cell)] = _attention_translation(cell)
    return table


def decompositions() -> dict[Any, Callable[..., Any]]:
    """What ``export`` decomposes before translating: every attention op, and the base LSTM op when it
    has a projection (otherwise it declines, and the op becomes ONNX's LSTM)."""
    table: dict[Any, Callable[..., Any]] = {}
    for cell in _ops.CELLS:
        table[_ops.attention_forward_op(cell)] = unrolled.attention_op(cell)
    unrolled_lstm = unrolled.base_op("lstm")

    def lstm_if_projected(*args):
        weight_hr = unrolled.op_weight_hr("lstm", args)
        return NotImplemented if weight_hr is None else unrolled_lstm(*args)

    table[_ops.forward_op("lstm")] = lstm_if_projected
    return table


def _export_for_inference(model: torch.nn.Module, args: tuple, kwargs, dynamic_shapes):
    """torch.export of the model with its parameters not requiring grad (restored after): ONNX holds no
    gradients, and the exporter's passes would otherwise trace a time loop's (scan's) backward too,
    whose saved sizes a dynamic batch makes symbolic, which scan cannot hold."""
    trained = [p for p in model.parameters() if p.requires_grad]
    for p in trained:
        p.requires_grad_(False)
    try:
        return torch.export.export(model, args, kwargs=kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    finally:
        for p in trained:
            p.requires_grad_(True)


def export(model, args: tuple = (), f=None, *, kwargs: dict | None = None, dynamic_shapes=None, **options):
    """``torch.onnx.export(model, args, f, dynamo=True, ...)`` for models with rnnattn layers: the model
    (a module, or an ExportedProgram) is exported with ``torch.export`` (``kwargs``, ``dynamic_shapes``),
    ``decompositions()`` applied, then translated with ``translation_table()`` (entries of a given
    ``custom_translation_table`` win). Returns the ONNXProgram. What cannot be expressed raises
    UnsupportedForOnnx."""
    if options.pop("dynamo", True) is not True:
        raise ValueError("rnnattn_ext.onnx_export.export: dynamo must be True (the TorchScript exporter has no "
                         "translation of the rnnattn ops), got dynamo=False")
    table = translation_table()
    table.update(options.pop("custom_translation_table", None) or {})
    try:
        if isinstance(model, torch.export.ExportedProgram):
            program = model
        else:
            program = _export_for_inference(model, tuple(args), kwargs, dynamic_shapes)
        program = program.run_decompositions(decompositions())
        return torch.onnx.export(program, f=f, dynamo=True, custom_translation_table=table, **options)
    except Exception as error:
        cause: BaseException | None = error
        while cause is not None and not isinstance(cause, UnsupportedForOnnx):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        message = str(cause).split("\n\nWhile executing")[0]  # without the graph node torch appends
        raise UnsupportedForOnnx(message) from error
