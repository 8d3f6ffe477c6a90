"""ONNX export (rnnattn_ext.onnx_export): the base layers become ONNX's LSTM/GRU/RNN operators; the
attention-augmented cells and the LSTM projection are decomposed into a time loop of plain operators
(rnnattn_ext.unrolled, checked here against the ops), unrolled for a static number of steps, ONNX's
Scan for a dynamic one; the exported models, run by onnxruntime, give the modules' outputs and final
states; what cannot be exported fails at export saying why."""

from __future__ import annotations

import itertools
import logging

import pytest
import torch

import rnnattn_ext
from rnnattn_ext import _ops, unrolled

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


@pytest.mark.parametrize("cell", sorted(MODULES))
def test_bfloat16_layer_exports_through_float_and_runs_like_the_module(cell):
    # ONNX's recurrent operators take no bfloat16: the translation casts to float around them. The
    # model is run by onnx's reference evaluator (onnxruntime's Python API returns no bfloat16 arrays).
    ml_dtypes = pytest.importorskip("ml_dtypes", reason="the reference evaluator's bfloat16 arrays (onnx needs it)")
    from onnx.reference import ReferenceEvaluator

    torch.manual_seed(0)
    model = MODULES[cell](4, 6, num_layers=2, bidirectional=True).to(torch.bfloat16).eval()
    x = torch.randn(7, 3, 4, dtype=torch.bfloat16)
    program = _export(model, (x,))
    nodes = program.model_proto.graph.node
    assert sum(n.op_type == ONNX_OPERATOR[cell] for n in nodes) == 4
    if cell == "rnn_relu":
        return  # the reference evaluator's RNN has no Relu (onnxruntime runs it: the float tests above)
    got = ReferenceEvaluator(program.model_proto).run(
        None, {program.model_proto.graph.input[0].name: x.float().numpy().astype(ml_dtypes.bfloat16)})
    with torch.no_grad():
        expected = _flat(model(x))
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert str(g.dtype) == "bfloat16"
        # Ours rounds x and h_{t-1} to bfloat16 in its products (CPUs with AVX512-BF16), ONNX's runs
        # them in float: the results differ by a bfloat16 rounding or two.
        torch.testing.assert_close(torch.from_numpy(g.astype("float32")), e.float(), rtol=1.6e-2, atol=8e-3)


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


class HybridStep(torch.nn.Module):
    """One HybridBlock.stream step, its HybridState's tensors as inputs and outputs (a streaming decode)."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x, h, c, keys, values):
        y, state = self.block.stream(x, rnnattn_ext.HybridState((h, c), keys, values))
        return y, state.hidden[0], state.hidden[1], state.keys, state.values


def test_hybrid_block_streaming_step_export():
    torch.manual_seed(4)
    block = rnnattn_ext.HybridBlock(3, 8, num_heads=2, window=4, cell="lstm").eval()
    with torch.no_grad():
        _, state = block.stream(torch.randn(5, 2, 3))  # the window has filled: 3 positions kept
    step = HybridStep(block)
    args = (torch.randn(1, 2, 3), *state.hidden, state.keys, state.values)
    _assert_runs_like(step, _export(step, args), args)


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


def _unrolled_cases():
    for cell, projected, memory, window, lengths, reverse, past in itertools.product(
            _ops.CELLS, [False, True], [False, True], [None, 1, 3], [False, True], [False, True], [False, True]):
        if projected and cell not in _ops.PROJECTED_CELLS:
            continue
        if (memory and window is not None) or (past and (memory or reverse or lengths)):
            continue  # no window over external memory; past slots stream one direction without lengths
        yield cell, projected, memory, window, lengths, reverse, past


@pytest.mark.parametrize("in_scan", [False, True], ids=["loop", "scan"])
@pytest.mark.parametrize("cell, projected, memory, window, lengths, reverse, past", list(_unrolled_cases()))
def test_unrolled_ops_give_the_ops_results(cell, projected, memory, window, lengths, reverse, past, in_scan):
    # What the export decomposes into, in its Python loop (static steps) and in torch's scan (dynamic
    # steps), against the ops themselves in float64: every output, the attention weights' layout
    # included, for lengths, reversal, windows, external memory with padded rows and streamed past slots.
    torch.manual_seed(7)
    gates, num_states, _ = _ops.CELL_LAYOUTS[cell]
    steps, batch, inputs, hidden, heads, head_dim = 5, 3, 4, 6, 2, 2
    width = heads * head_dim
    state_width = 4 if projected else hidden
    memory_width = 3 if memory else state_width

    def rand(*shape):
        return torch.randn(*shape, dtype=torch.float64)

    x = rand(steps, batch, inputs)
    states = [rand(batch, state_width)] + [rand(batch, hidden) for _ in range(num_states - 1)]
    base = [rand(gates * hidden, inputs), rand(gates * hidden, state_width), rand(gates * hidden),
            rand(gates * hidden)]
    projection = [rand(state_width, hidden) if projected else None] if cell in _ops.PROJECTED_CELLS else []
    attention = [rand(width, state_width), rand(width), rand(width, memory_width), rand(width),
                 rand(width, memory_width), rand(width), rand(gates * hidden, width)]
    extra = [rand(4, batch, memory_width) if memory else None, torch.tensor([4, 2, 1]) if memory else None,
             torch.tensor([5, 2, 3]) if lengths else None, rand(2, batch, width) if past else None,
             rand(2, batch, width) if past else None]
    args = (x, *states, *base, *projection, *attention, *extra, heads, window, reverse, False, True)
    expected = _ops.attention_forward_op(cell)(*args)
    got = unrolled.attention_op(cell, in_scan)(*args)
    # output, final states, context, attention weights (the workspaces only serve backward)
    assert len(got) == len(expected)
    for e, g in zip(expected[: num_states + 3], got[: num_states + 3]):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)
    if not memory:
        base_args = (x, *states, *base, *projection, extra[2], reverse, False)
        expected, got = _ops.forward_op(cell)(*base_args), unrolled.base_op(cell, in_scan)(*base_args)
        assert len(got) == len(expected)
        for e, g in zip(expected[:-1], got[:-1]):
            torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)


ATTENTION_MODELS = {
    "LSTM_proj": (lambda: rnnattn_ext.LSTM(4, 6, proj_size=3, num_layers=2), False),
    "AttnLSTM_window": (lambda: rnnattn_ext.AttnLSTM(4, 6, num_heads=2, head_dim=2, window=3, proj_size=4), False),
    "AttnGRU_external_lengths": (lambda: rnnattn_ext.AttnGRU(4, 6, num_heads=2, head_dim=2, memory_size=3,
                                                             bidirectional=True), True),
    "AttnRNN_unbounded": (lambda: rnnattn_ext.AttnRNN(4, 6, num_layers=2, num_heads=1, nonlinearity="relu"), False),
}


class WithMemory(torch.nn.Module):
    """An attention module over an external memory, with lengths for both."""

    def __init__(self, recurrent):
        super().__init__()
        self.recurrent = recurrent

    def forward(self, x, memory, memory_lengths, lengths):
        return self.recurrent(x, None, memory, memory_lengths, lengths=lengths)


def _attention_model_args(external, steps, batch, memory_slots=4):
    x = torch.randn(steps, batch, 4)
    if not external:
        return (x,)
    return (x, torch.randn(memory_slots, batch, 3), torch.randint(1, memory_slots + 1, (batch,)),
            torch.randint(1, steps + 1, (batch,)))


@pytest.mark.parametrize("dynamic", [False, True], ids=["static_steps", "dynamic_steps"])
@pytest.mark.parametrize("name", sorted(ATTENTION_MODELS))
def test_decomposed_layers_export_and_run_like_the_module(name, dynamic):
    # A static number of steps unrolls the loop; a dynamic one becomes ONNX's Scan, which then runs
    # other numbers of steps (and batch sizes, memory lengths) than the exported ones.
    torch.manual_seed(8)
    make, external = ATTENTION_MODELS[name]
    model = make().eval()
    if external:
        model = WithMemory(model).eval()
    args = _attention_model_args(external, 5, 2)
    shapes = None
    if dynamic:
        steps, batch = torch.export.Dim("steps", min=1, max=1024), torch.export.Dim("batch", min=1, max=1024)
        shapes = ({0: steps, 1: batch},)
        if external:
            shapes += ({0: torch.export.Dim("slots", min=1, max=1024), 1: batch}, {0: batch}, {0: batch})
    program = _export(model, args, dynamic_shapes=shapes)
    node_types = {n.op_type for n in program.model_proto.graph.node}
    assert all(n.domain in ("", "ai.onnx") for n in program.model_proto.graph.node)
    assert ("Scan" in node_types) == dynamic
    _assert_runs_like(model, program, args)
    if dynamic:
        for steps, batch, slots in [(1, 1, 2), (9, 3, 6)]:
            _assert_runs_like(model, program, _attention_model_args(external, steps, batch, slots))


class StreamStep(torch.nn.Module):
    """One streaming step of a self-memory AttnLSTM, its state as plain tensors."""

    def __init__(self, cell):
        super().__init__()
        self.cell = cell

    def forward(self, x, h, c, keys, values):
        output, state = self.cell.stream(x, rnnattn_ext.AttentionState(h, c, [keys], [values]))
        return output, state.h, state.c, state.keys[0], state.values[0]


def test_streaming_attention_step_exports_and_decodes_like_stream():
    # Step-by-step decoding: the exported step, fed its own state, follows the module's stream. (The
    # stream's carried slots depend on the chunk's length: a step exports with a static one.)
    torch.manual_seed(9)
    cell = rnnattn_ext.AttnLSTM(4, 6, num_heads=2, head_dim=2, window=4).eval()
    with torch.no_grad():
        _, state = cell.stream(torch.randn(3, 2, 4))  # window - 1 = 3 slots carried from here on
    step = StreamStep(cell).eval()
    program = _export(step, (torch.randn(1, 2, 4), state.h, state.c, state.keys[0], state.values[0]))
    assert all(p.requires_grad for p in cell.parameters())  # as before the export
    carried = [state.h, state.c, state.keys[0], state.values[0]]
    for _ in range(4):
        x = torch.randn(1, 2, 4)
        output, *got = _run_onnx(program, (x, *carried))
        with torch.no_grad():
            expected, state = cell.stream(x, state)
        torch.testing.assert_close(torch.from_numpy(output), expected, rtol=1e-5, atol=1e-5)
        carried = [torch.from_numpy(g) for g in got]
        torch.testing.assert_close(carried[0], state.h, rtol=1e-5, atol=1e-5)


class DecoderStep(torch.nn.Module):
    """One step of an attention decoder over an encoder's outputs."""

    def __init__(self):
        super().__init__()
        self.decoder = rnnattn_ext.AttnGRU(4, 6, num_heads=2, head_dim=2, memory_size=3)

    def forward(self, x, h, memory, memory_lengths):
        return self.decoder(x, h, memory, memory_lengths)


def test_decoder_step_exports_with_dynamic_memory_length_and_batch():
    # One step per call (unrolled), a dynamic memory length and batch size.
    torch.manual_seed(10)
    model = DecoderStep().eval()
    slots, batch = torch.export.Dim("slots", min=1, max=512), torch.export.Dim("batch", min=1, max=512)
    args = (torch.randn(1, 2, 4), torch.randn(1, 2, 6), torch.randn(5, 2, 3), torch.tensor([5, 3]))
    program = _export(model, args, dynamic_shapes=({1: batch}, {1: batch}, {0: slots, 1: batch}, {0: batch}))
    for memory_length, rows in [(5, 2), (9, 3), (2, 1)]:
        other = (torch.randn(1, rows, 4), torch.randn(1, rows, 6), torch.randn(memory_length, rows, 3),
                 torch.randint(1, memory_length + 1, (rows,)))
        _assert_runs_like(model, program, other)


def test_translation_table_alone_refuses_what_needs_a_decomposition_saying_why():
    model = rnnattn_ext.AttnGRU(4, 5, num_heads=2, head_dim=2, window=3).eval()
    x = torch.randn(5, 2, 4)
    # torch.onnx.export with only the translation table cannot decompose: the message names the way.
    with pytest.raises(Exception, match="gru_attn_forward.*rnnattn_ext.onnx_export.export"):
        torch.onnx.export(model, (x,), dynamo=True, verbose=False,
                          custom_translation_table=onnx_export.translation_table())
    with pytest.raises(Exception, match="proj_size > 0.*rnnattn_ext.onnx_export.export"):
        torch.onnx.export(rnnattn_ext.LSTM(4, 5, proj_size=3).eval(), (x,), dynamo=True, verbose=False,
                          custom_translation_table=onnx_export.translation_table())


def test_export_refuses_the_torchscript_exporter():
    with pytest.raises(ValueError, match="dynamo must be True"):
        onnx_export.export(rnnattn_ext.GRU(4, 5), (torch.randn(5, 2, 4),), dynamo=False)
