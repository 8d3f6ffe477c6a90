"""ONNX export (rnnattn_ext.onnx_export): the base layers become ONNX's LSTM/GRU/RNN operators, and the
exported model, run by onnxruntime, gives the module's outputs and final states; what ONNX has no
operator for fails at export with a message that says so."""

from __future__ import annotations

import logging

import pytest
import torch

import rnnattn_ext

onnx = pytest.importorskip("onnx", reason="the ONNX tests need onnx (scripts/setup.sh installs it)")
pytest.importorskip("onnxscript", reason="the ONNX tests need onnxscript (scripts/setup.sh installs it)")
ort = pytest.importorskip("onnxruntime", reason="the ONNX tests need onnxruntime (scripts/setup.sh installs it)")

from rnnattn_ext import onnx_export  # noqa: E402  (needs onnxscript)

MODULES = {"lstm": rnnattn_ext.LSTM, "gru": rnnattn_ext.GRU, "rnn_tanh": rnnattn_ext.RNN,
           "rnn_relu": lambda *a, **k: rnnattn_ext.RNN(*a, nonlinearity="relu", **k)}
ONNX_OPERATOR = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN", "rnn_relu": "RNN"}


@pytest.fixture(autouse=True)
def quiet_exporter():
    # The exporter logs every pass at WARNING; the tests read only what they assert.
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


def _flat(values) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for v in values if isinstance(values, (tuple, list)) else [values]:
        out += _flat(v) if isinstance(v, (tuple, list)) else [v]
    return out


def _export(model, args, **kwargs):
    program = onnx_export.export(model, args, verbose=False, **kwargs)
    onnx.checker.check_model(program.model_proto, full_check=True)
    return program


def _run_onnx(program, args) -> list:
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {spec.name: value.numpy() for spec, value in zip(session.get_inputs(), _flat(args))}
    return session.run(None, feeds)


def _assert_runs_like(model, program, args):
    with torch.no_grad():
        expected = _flat(model(*args))
    got = _run_onnx(program, args)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(torch.from_numpy(g), e, rtol=1e-5, atol=1e-5)


class WithLengths(torch.nn.Module):
    """A module whose forward takes the lengths as a tensor input."""

    def __init__(self, recurrent):
        super().__init__()
        self.recurrent = recurrent

    def forward(self, x, lengths):
        return self.recurrent(x, lengths=lengths)


CONFIGS = {
    "one_layer": dict(kwargs={}, batch_first=False, hx=False),
    "two_layers_bidirectional_hx": dict(kwargs=dict(num_layers=2, bidirectional=True), batch_first=False, hx=True),
    "batch_first_no_bias": dict(kwargs=dict(bias=False, batch_first=True), batch_first=True, hx=False),
}


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("cell", sorted(MODULES))
def test_exported_layer_runs_like_the_module(cell, config):
    torch.manual_seed(0)
    c = CONFIGS[config]
    model = MODULES[cell](4, 6, **c["kwargs"]).eval()
    x = torch.randn(3, 7, 4) if c["batch_first"] else torch.randn(7, 3, 4)
    args: tuple = (x,)
    if c["hx"]:
        layers = 2 * model.num_layers if model.bidirectional else model.num_layers
        h0 = torch.randn(layers, 3, 6)
        args = (x, (h0, torch.randn(layers, 3, 6))) if cell == "lstm" else (x, h0)
    program = _export(model, args)
    nodes = program.model_proto.graph.node
    # ONNX's own operator, one per layer and direction; nothing of ours is left in the graph.
    assert sum(n.op_type == ONNX_OPERATOR[cell] for n in nodes) == model.num_layers * (2 if model.bidirectional else 1)
    assert all(n.domain in ("", "ai.onnx") for n in nodes)
    _assert_runs_like(model, program, args)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_exported_lengths_hold_rows_as_the_module(cell):
    # ONNX's sequence_lens: outputs past a row's length are zero, the final state is the one at its
    # length, the reverse direction runs over each row's own steps (SPEC "Variable lengths").
    torch.manual_seed(1)
    model = WithLengths(MODULES[cell](4, 5, num_layers=2, bidirectional=True)).eval()
    args = (torch.randn(6, 4, 4), torch.tensor([3, 6, 1, 4]))
    program = _export(model, args)
    _assert_runs_like(model, program, args)
    output = torch.from_numpy(_run_onnx(program, args)[0])
    assert output[3:, 0].abs().sum() == 0 and output[1:, 2].abs().sum() == 0


def test_exported_model_takes_other_sequence_lengths_and_batch_sizes():
    torch.manual_seed(2)
    model = rnnattn_ext.GRU(4, 5, num_layers=2, batch_first=True).eval()
    steps, batch = torch.export.Dim("steps", min=1, max=4096), torch.export.Dim("batch", min=1, max=4096)
    program = _export(model, (torch.randn(3, 6, 4),), dynamic_shapes=({0: batch, 1: steps},))
    for shape in [(2, 9, 4), (5, 1, 4), (1, 17, 4)]:
        _assert_runs_like(model, program, (torch.randn(*shape),))


def test_unbatched_input_and_hybrid_block_export():
    torch.manual_seed(3)
    model = rnnattn_ext.LSTM(4, 5).eval()
    _assert_runs_like(model, _export(model, (torch.randn(6, 4),)), (torch.randn(6, 4),))
    hybrid = rnnattn_ext.HybridBlock(4, 8, num_heads=2, window=3, cell="gru").eval()
    x = torch.randn(6, 2, 4)
    _assert_runs_like(hybrid, _export(hybrid, (x,)), (x,))


class OneOp(torch.nn.Module):
    """The LSTM op itself, reversed, with a recurrent bias and no input bias (ONNX takes both halves of
    the bias or none: the translation fills the absent one with zeros)."""

    def __init__(self):
        super().__init__()
        self.w_ih, self.w_hh = torch.nn.Parameter(torch.randn(20, 4)), torch.nn.Parameter(torch.randn(20, 5))
        self.b_hh = torch.nn.Parameter(torch.randn(20))

    def forward(self, x, h0, c0):
        output, h_n, c_n, _ = torch.ops.rnnattn.lstm_forward(x, h0, c0, self.w_ih, self.w_hh, None, self.b_hh, None,
                                                             None, True, False)
        return output, h_n, c_n


def test_exported_op_with_one_bias_half_and_reverse():
    torch.manual_seed(6)
    model = OneOp().eval()
    args = (torch.randn(5, 2, 4), torch.randn(2, 5), torch.randn(2, 5))
    _assert_runs_like(model, _export(model, args), args)


def test_translation_table_serves_torch_onnx_export():
    torch.manual_seed(4)
    model = rnnattn_ext.RNN(4, 5, nonlinearity="relu").eval()
    x = torch.randn(5, 2, 4)
    program = torch.onnx.export(model, (x,), dynamo=True, verbose=False,
                                custom_translation_table=onnx_export.translation_table())
    _assert_runs_like(model, program, (x,))


def test_given_translation_wins_over_ours():
    # A caller's entry for one of our ops replaces ours: here it doubles the output.
    from onnxscript import opset18 as op

    base = onnx_export.translation_table()[torch.ops.rnnattn.gru_forward.default]

    def doubled(*args):
        output, *rest = base(*args)
        return (op.Add(output, output), *rest)

    torch.manual_seed(5)
    model = rnnattn_ext.GRU(4, 5).eval()
    x = torch.randn(5, 2, 4)
    program = _export(model, (x,), custom_translation_table={torch.ops.rnnattn.gru_forward.default: doubled})
    with torch.no_grad():
        expected = model(x)[0] * 2
    torch.testing.assert_close(torch.from_numpy(_run_onnx(program, (x,))[0]), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make, words", [
    (lambda: rnnattn_ext.LSTM(4, 5, proj_size=3), ["proj_size > 0", "weight_hr", "(3, 5)", "no projection"]),
    (lambda: rnnattn_ext.AttnGRU(4, 5, num_heads=2, head_dim=2, window=3),
     ["gru_attn_forward", "attention-augmented", "torch.export"]),
    (lambda: rnnattn_ext.AttnLSTM(4, 5, num_heads=1, memory_size=3), ["lstm_attn_forward"]),
])
def test_what_onnx_cannot_hold_fails_at_export_saying_why(make, words):
    model = make().eval()
    args: tuple = (torch.randn(5, 2, 4),)
    if getattr(model, "memory_size", None):
        args = (args[0], None, torch.randn(3, 2, 3))
    with pytest.raises(onnx_export.UnsupportedForOnnx) as caught:
        onnx_export.export(model, args, verbose=False)
    for word in words:
        assert word in str(caught.value)


def test_export_refuses_the_torchscript_exporter():
    with pytest.raises(ValueError, match="dynamo must be True"):
        onnx_export.export(rnnattn_ext.GRU(4, 5), (torch.randn(5, 2, 4),), dynamo=False)
