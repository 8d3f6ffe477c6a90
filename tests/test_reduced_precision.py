"""bfloat16 and float16 on the CPU: the layers take them as torch.nn's do, compute in float32 (SPEC:
reduced precision computes in fp32; a bfloat16 layer's products take bfloat16 operands where the CPU
has AVX512-BF16) and return outputs and gradients in the tensors' own dtype. Accuracy by the SPEC's
rule: against float64 on the same (rounded) values, our error at most twice that of torch.nn (or the
eager reference) in that dtype."""

import pytest
import torch

import rnnattn_ext
from rnnattn_ext import _ops, functional, info, reference

from helpers import assert_accuracy_rule, attention_args

DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="f16")]
MODULES = {
    "LSTM": (lambda: rnnattn_ext.LSTM(6, 8, num_layers=2, bidirectional=True),
             lambda: torch.nn.LSTM(6, 8, num_layers=2, bidirectional=True)),
    "LSTM_proj": (lambda: rnnattn_ext.LSTM(6, 8, proj_size=3, batch_first=True),
                  lambda: torch.nn.LSTM(6, 8, proj_size=3, batch_first=True)),
    "GRU": (lambda: rnnattn_ext.GRU(6, 8, num_layers=2), lambda: torch.nn.GRU(6, 8, num_layers=2)),
    "RNN_relu": (lambda: rnnattn_ext.RNN(6, 8, nonlinearity="relu"),
                 lambda: torch.nn.RNN(6, 8, nonlinearity="relu")),
}


def _run(module, x):
    """Outputs and the gradients of x and of every parameter, for a fixed random loss."""
    x = x.detach().requires_grad_()
    output, state = module(x)
    outputs = [output, *(state if isinstance(state, tuple) else (state,))]
    gen = torch.Generator().manual_seed(5)
    probes = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in outputs]
    loss = sum((o.double() * p).sum() for o, p in zip(outputs, probes))
    return [o.detach() for o in outputs], torch.autograd.grad(loss, [x, *module.parameters()])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", MODULES)
def test_module_matches_torch_nn_by_the_accuracy_rule(name, dtype):
    torch.manual_seed(0)
    make_ours, make_theirs = MODULES[name]
    ours = make_ours().to(dtype)
    theirs = make_theirs().to(dtype)
    theirs.load_state_dict(ours.state_dict())
    exact = make_ours().double()
    exact.load_state_dict(ours.state_dict())  # the rounded weights, exactly
    x = torch.randn(7, 3, 6).to(dtype)
    got, got_grads = _run(ours, x)
    eager, eager_grads = _run(theirs, x)
    truth, truth_grads = _run(exact, x.double())
    for i, (a, b, e) in enumerate(zip(got, eager, truth)):
        assert a.dtype == dtype
        assert_accuracy_rule(a, b, e, f"output {i}")
    names = ["input"] + [n for n, _ in ours.named_parameters()]
    for n, a, b, e in zip(names, got_grads, eager_grads, truth_grads):
        assert a.dtype == dtype, n
        assert_accuracy_rule(a, b, e, f"gradient of {n}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("memory_slots", [None, 4], ids=["self", "external"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_attention_layer_matches_the_eager_reference_by_the_accuracy_rule(cell, memory_slots, dtype):
    gen = torch.Generator().manual_seed(2)
    x, states, weights, memory = attention_args(cell, 6, 3, 5, 8, num_heads=2, head_dim=4, memory_slots=memory_slots,
                                                dtype=dtype, generator=gen)
    window = 3 if memory is None else None

    def run(impl, tensors):
        x, *rest = tensors
        ns = len(states)
        weights, mem = rest[ns : ns + 11], rest[-1] if memory is not None else None
        if impl is functional:
            out, finals, context, _ = functional.attention_layer(cell, x, rest[:ns], weights, 2, window, mem)
        else:
            out, finals, context, _ = reference.attention_layer(cell, x, rest[:ns], *weights, 2, window, mem)
        outputs = [out, *finals, context]
        probes = [torch.randn(o.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
                  for o in outputs]
        loss = sum((o.double() * p).sum() for o, p in zip(outputs, probes))
        leaves = [t for t in tensors if t is not None]
        return [o.detach() for o in outputs] + list(torch.autograd.grad(loss, leaves))

    tensors = [x, *states, *weights] + ([memory] if memory is not None else [])
    got = run(functional, tensors)
    eager = run(reference, tensors)
    truth = run(reference, [None if t is None else t.detach().double().requires_grad_() for t in tensors])
    for i, (a, b, e) in enumerate(zip(got, eager, truth)):
        assert a.dtype == dtype, i
        assert_accuracy_rule(a, b, e, f"result {i}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_module_and_streaming_in_reduced_precision(dtype):
    torch.manual_seed(1)
    module = rnnattn_ext.AttnGRU(5, 8, num_heads=2, head_dim=4, window=3).to(dtype)
    x = torch.randn(6, 2, 5).to(dtype)
    whole, h = module(x)
    assert whole.dtype == h.dtype == dtype
    state, chunks = None, []
    for chunk in x.split(2):
        y, state = module.stream(chunk, state)
        chunks.append(y)
    # Each chunk's results pass through the dtype before the next call reads them: equal to rounding.
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(torch.cat(chunks), whole, atol=4 * eps, rtol=4 * eps)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_the_base_ops_take_reduced_precision_on_the_cpu(cell, dtype):
    """The ops compute it in float32 themselves: results and gradients in the dtype, the saved
    activations in float32 (as computed), what the op registrations promise (opcheck), and by the
    accuracy rule against float64."""
    gen = torch.Generator().manual_seed(4)
    gates, num_states, _ = _ops.CELL_LAYOUTS[cell]
    x = torch.randn(9, 3, 4, generator=gen).to(dtype)
    states = [torch.randn(3, 5, generator=gen).to(dtype) for _ in range(num_states)]
    weights = [(torch.randn(gates * 5, width, generator=gen) / 2).to(dtype) for width in (4, 5)]
    biases = [torch.randn(gates * 5, generator=gen).to(dtype) for _ in range(2)]
    op = _ops.forward_op(cell)
    no_projection = [None] if cell in _ops.PROJECTED_CELLS else []
    arguments = (x, *states, *weights, *biases, *no_projection, None, False, True)
    output, *finals, workspace = op(*arguments)
    assert output.dtype == dtype and all(f.dtype == dtype for f in finals)
    assert workspace.dtype == torch.float32  # the float32 loop's saved values, as computed (_ops.workspace_dtype)
    torch.library.opcheck(op, arguments)
    # The backward takes that workspace, and names float32 when given one in the input's dtype.
    backward = _ops.backward_op(cell)
    given = dict(zip([a.name for a in op._schema.arguments], arguments))
    given.update(zip([r.name for r in op._schema.returns], (output, *finals, workspace)))
    for name in [r.name for r in op._schema.returns][:-1]:
        given[f"grad_{name}"] = torch.ones_like(given[name])
    backward_arguments = [given[a.name] for a in backward._schema.arguments]
    torch.library.opcheck(backward, backward_arguments)
    backward_arguments[[a.name for a in backward._schema.arguments].index("workspace")] = workspace.to(dtype)
    aten_name = {torch.bfloat16: "BFloat16", torch.float16: "Half"}[dtype]  # as C++ prints dtypes
    with pytest.raises(TypeError, match=rf"workspace must be Float for input of {aten_name} on cpu .*got {aten_name}"):
        backward(*backward_arguments)
    leaves = [t.detach().requires_grad_() for t in (x, *states, *weights, *biases)]
    got = functional.layer(cell, leaves[0], leaves[1 : 1 + num_states], *leaves[1 + num_states :])[0]
    got.double().sum().backward()
    assert all(leaf.grad.dtype == dtype for leaf in leaves)
    exact = functional.layer(cell, x.double(), [s.double() for s in states], *(t.double() for t in (*weights, *biases)))
    eager = reference.layer(cell, x, states, *weights, *biases)
    assert_accuracy_rule(got.detach(), eager[0], exact[0], "output")


def test_the_attention_ops_take_float32_or_float64_on_the_cpu():
    x, states, weights, _ = attention_args("gru", 3, 2, 4, 5, num_heads=1, head_dim=4, dtype=torch.bfloat16,
                                           requires_grad=False, generator=torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match="input must be float32 or float64 on the CPU \\(the attention modules"):
        torch.ops.rnnattn.gru_attn_forward(x, *states, *weights, None, None, None, None, None, 1, 2, False, False,
                                           False)


@pytest.mark.skipif(not info.cpu_bf16_products(), reason="this CPU (or RNNATTN_CPU_KERNELS) runs bfloat16 layers' "
                    "products in float32: no AVX512-BF16 to test")
@pytest.mark.parametrize("cell", ["rnn_tanh", "gru"])
def test_bfloat16_products_round_x_and_h_to_bfloat16(cell):
    """Where the CPU has AVX512-BF16 a bfloat16 layer's products take x and h_{t-1} in bfloat16 (float32
    sums), the rest of the step in float32: the same layer computed so in float64 (h rounded to bfloat16
    only where a product reads it) gives our outputs up to their last bit, while the float32 layer on
    the same bfloat16 values (what a CPU without it computes) differs from them in many more."""
    gen = torch.Generator().manual_seed(11)
    gates = _ops.CELL_LAYOUTS[cell][0]
    steps, batch, width = 40, 16, 64
    x = torch.randn(steps, batch, width, generator=gen).bfloat16()
    h0 = torch.randn(batch, width, generator=gen).bfloat16()
    w_ih, w_hh = ((torch.randn(gates * width, width, generator=gen) / width**0.5).bfloat16() for _ in range(2))
    b_ih, b_hh = (torch.randn(gates * width, generator=gen).bfloat16() for _ in range(2))
    with torch.no_grad():
        ours = functional.layer(cell, x, [h0], w_ih, w_hh, b_ih, b_hh)[0]
        in_float = functional.layer(cell, x.float(), [h0.float()], w_ih.float(), w_hh.float(), b_ih.float(),
                                    b_hh.float())[0].bfloat16()
        h, emulated = h0.double(), []
        for t in range(steps):
            xg = x[t].double() @ w_ih.double().t() + b_ih.double()
            hg = h.bfloat16().double() @ w_hh.double().t() + b_hh.double()
            h = reference.cell_update(cell, xg, hg, [h])[0]
            emulated.append(h)
        emulated = torch.stack(emulated).bfloat16()
    off_emulated = (ours != emulated).sum().item()
    off_float = (ours != in_float).sum().item()
    assert off_float > 4 * off_emulated + 100, (off_emulated, off_float)


@pytest.mark.parametrize("input_dtype,module_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16),
                                                     (torch.float16, torch.bfloat16)])
@pytest.mark.parametrize("make", [lambda: rnnattn_ext.GRU(4, 5), lambda: rnnattn_ext.LSTM(4, 5, num_layers=2),
                                  lambda: rnnattn_ext.AttnLSTM(4, 5, num_heads=1)], ids=["GRU", "LSTM2", "AttnLSTM"])
def test_an_input_of_another_dtype_is_refused(make, input_dtype, module_dtype):
    module = make().to(module_dtype)
    with pytest.raises(TypeError, match=rf"input must have the parameters' dtype \({module_dtype}\), got {input_dtype}"):
        module(torch.randn(3, 2, 4, dtype=input_dtype))


def test_compiles_without_graph_breaks():
    torch.manual_seed(3)
    module = rnnattn_ext.LSTM(4, 5, num_layers=2).to(torch.bfloat16)
    x = torch.randn(6, 2, 4, dtype=torch.bfloat16)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    got, expected = compiled(x), module(x)
    torch.testing.assert_close(got[0], expected[0], atol=0, rtol=0)
    torch.testing.assert_close(got[1][1], expected[1][1], atol=0, rtol=0)
