"""rnnattn_ext.LSTMCell / GRUCell / RNNCell against torch.nn's cells with copied weights: one step and
a loop of steps, batched and unbatched, every gradient, initialisation, state_dict, repr, errors,
torch.compile, torch.export, reduced precision."""

import pytest
import torch

import rnnattn_ext

from conftest import device_params

CELLS = {
    "LSTMCell": (torch.nn.LSTMCell, rnnattn_ext.LSTMCell, {}),
    "GRUCell": (torch.nn.GRUCell, rnnattn_ext.GRUCell, {}),
    "RNNCell_tanh": (torch.nn.RNNCell, rnnattn_ext.RNNCell, {}),
    "RNNCell_relu": (torch.nn.RNNCell, rnnattn_ext.RNNCell, {"nonlinearity": "relu"}),
}


def make_pair(kind, input_size=5, hidden=7, bias=True, device="cpu", dtype=torch.float64):
    torch_cls, our_cls, extra = CELLS[kind]
    theirs = torch_cls(input_size, hidden, bias=bias, **extra).to(device=device, dtype=dtype)
    ours = our_cls(input_size, hidden, bias=bias, **extra).to(device=device, dtype=dtype)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def as_list(result):
    return list(result) if isinstance(result, tuple) else [result]


def random_hx(kind, shape, device, dtype):
    def state():
        return torch.randn(shape, device=device, dtype=dtype, requires_grad=True)

    return (state(), state()) if kind == "LSTMCell" else state()


def check_loop(kind, batch, steps, with_hx, bias, device, dtype, atol, rtol):
    """`steps` steps of both cells, each fed its own last state: the states after every step and the
    gradients of a loss on all of them with respect to the inputs, the first state and the weights."""
    torch.manual_seed(1234)
    theirs, ours = make_pair(kind, bias=bias, device=device, dtype=dtype)
    shape = (batch, 7) if batch else (7,)
    xs = torch.randn((steps, batch, 5) if batch else (steps, 5), device=device, dtype=dtype, requires_grad=True)
    hx = random_hx(kind, shape, device, dtype) if with_hx else None
    results = {}
    for name, cell in (("torch.nn", theirs), ("ours", ours)):
        state, outputs = hx, []
        for x in xs:
            state = cell(x, state)
            outputs += as_list(state)
        results[name] = outputs
    for step, (a, b) in enumerate(zip(results["ours"], results["torch.nn"])):
        assert a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m, step=step: f"state {step}: {m}")
    probes = [torch.randn_like(t) for t in results["torch.nn"]]
    leaves = [xs, *(as_list(hx) if hx is not None else [])]
    grads = {}
    for name, cell in (("torch.nn", theirs), ("ours", ours)):
        loss = sum((t * p).sum() for t, p in zip(results[name], probes))
        grads[name] = torch.autograd.grad(loss, leaves + list(cell.parameters()))
    names = ["input", "h_0", "c_0"][: len(leaves)] + [n for n, _ in theirs.named_parameters()]
    for name, a, b in zip(names, grads["ours"], grads["torch.nn"]):
        torch.testing.assert_close(a, b, atol=atol * 10, rtol=rtol * 10, msg=lambda m, name=name: f"grad {name}: {m}")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("with_hx", [False, True], ids=["no_hx", "hx"])
@pytest.mark.parametrize("batch", [0, 1, 3], ids=["unbatched", "batch1", "batch3"])
@pytest.mark.parametrize("kind", CELLS)
def test_cell_matches_torch_nn(kind, batch, with_hx, bias):
    # batch 0 stands for unbatched input here: (I,) and states (H,)
    check_loop(kind, batch, 4, with_hx, bias, "cpu", torch.float64, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("kind", CELLS)
def test_float32_matches_torch_nn(kind, device):
    check_loop(kind, 4, 6, True, True, device, torch.float32, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", CELLS)
def test_reduced_precision_on_the_cpu(kind, dtype):
    # Computed in float32 and rounded to the module's dtype (SPEC): within a few roundings of
    # torch.nn's cell in the same dtype, and results in that dtype.
    torch.manual_seed(3)
    theirs, ours = make_pair(kind, dtype=dtype)
    x = torch.randn(3, 5, dtype=dtype)
    hx = random_hx(kind, (3, 7), "cpu", dtype)
    with torch.no_grad():
        for a, b in zip(as_list(ours(x, hx)), as_list(theirs(x, hx))):
            assert a.dtype == dtype
            torch.testing.assert_close(a, b, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("kind", CELLS)
def test_same_initialisation_state_dict_and_repr(kind):
    torch_cls, our_cls, extra = CELLS[kind]
    for bias in (True, False):
        torch.manual_seed(9)
        theirs = torch_cls(4, 6, bias=bias, **extra)
        torch.manual_seed(9)
        ours = our_cls(4, 6, bias=bias, **extra)
        assert repr(ours) == repr(theirs)
        assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
        for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
            assert torch.equal(a, b), name
        assert ours.bias_ih is None if not bias else ours.bias_ih is not None
        theirs.load_state_dict(ours.state_dict())  # and back: the same keys and shapes
    ours = our_cls(4, 6, dtype=torch.float64)
    assert ours.weight_hh.dtype == torch.float64 and ours.input_size == 4 and ours.hidden_size == 6


@pytest.mark.parametrize("kind", CELLS)
def test_no_grad_steps_record_nothing(kind):
    _, ours = make_pair(kind)
    x = torch.randn(2, 5, dtype=torch.float64)
    with torch.no_grad():
        assert all(not t.requires_grad for t in as_list(ours(x)))
    with torch.inference_mode():
        assert all(t.is_inference() for t in as_list(ours(x)))


@pytest.mark.parametrize("kind", CELLS)
def test_compiles_with_the_eager_numbers(kind):
    torch.manual_seed(5)
    _, ours = make_pair(kind)
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    hx = random_hx(kind, (3, 7), "cpu", torch.float64)

    def two_steps(x, hx):
        state = ours(x, hx)
        return as_list(ours(x * 2, state))

    compiled = torch.compile(two_steps, fullgraph=True, backend="aot_eager")
    got, expected = compiled(x, hx), two_steps(x, hx)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    leaves = [x, *as_list(hx), *ours.parameters()]
    for a, b in zip(torch.autograd.grad(sum(t.sum() for t in got), leaves),
                    torch.autograd.grad(sum(t.sum() for t in expected), leaves)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("kind", CELLS)
def test_export_with_a_dynamic_batch(kind):
    # An exported step (a serving graph's decoder cell) runs at other batch sizes with the eager numbers.
    torch.manual_seed(6)
    _, ours = make_pair(kind, dtype=torch.float32)
    ours.eval()
    batch = torch.export.Dim("batch", min=2, max=1024)
    hx = random_hx(kind, (3, 7), "cpu", torch.float32)
    shapes = {"input": {0: batch}, "hx": ({0: batch}, {0: batch}) if kind == "LSTMCell" else {0: batch}}
    with torch.no_grad():
        program = torch.export.export(ours, (torch.randn(3, 5), hx), dynamic_shapes=shapes)
        x, hx = torch.randn(9, 5), random_hx(kind, (9, 7), "cpu", torch.float32)
        for a, b in zip(as_list(program.module()(x, hx)), as_list(ours(x, hx))):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", CELLS)
def test_bad_arguments_are_named(kind):
    _, ours = make_pair(kind)
    name = type(ours).__name__
    x = torch.randn(3, 5, dtype=torch.float64)
    lstm = kind == "LSTMCell"
    h = torch.zeros(3, 7, dtype=torch.float64)
    good = (h, h) if lstm else h
    label = "hx\\[0\\]" if lstm else "hx"
    cases = [
        ((torch.randn(2, 3, 5, dtype=torch.float64), None), ValueError, f"{name}: Expected input to be 1D or 2D, got 3D"),
        ((torch.randn(3, 4, dtype=torch.float64), None), ValueError, "input.size\\(-1\\) must be equal to input_size"),
        ((x.float(), None), TypeError, "input must have the parameters' dtype \\(torch.float64\\), got torch.float32"),
        (("x", None), TypeError, "input must be a Tensor, got str"),
        ((x, ((torch.zeros(4, 7, dtype=torch.float64),) * 2 if lstm else torch.zeros(4, 7, dtype=torch.float64))),
         ValueError, f"{label} must have shape \\(3, 7\\), got \\(4, 7\\)"),
        ((x, ((torch.zeros(7, dtype=torch.float64),) * 2 if lstm else torch.zeros(7, dtype=torch.float64))),
         ValueError, f"{label} must be 2-D as the input is, got 1-D"),
        ((x[0], good), ValueError, f"{label} must be 1-D as the input is, got 2-D"),
    ]
    if lstm:
        cases.append(((x, h), TypeError, "hx must be a tuple \\(h_0, c_0\\), got Tensor"))
        cases.append(((x, (h, torch.zeros(3, 6, dtype=torch.float64))), ValueError,
                      "hx\\[1\\] must have shape \\(3, 7\\), got \\(3, 6\\)"))
    else:
        cases.append(((x, (h,)), TypeError, "hx must be a Tensor, got tuple"))
    for args, error, message in cases:
        with pytest.raises(error, match=f"{name}: .*{message}" if not message.startswith(name) else message):
            ours(*args)
    with pytest.raises(ValueError, match="hidden_size must be greater than zero"):
        type(ours)(5, 0)
    with pytest.raises(TypeError, match="input_size must be an int, got float"):
        type(ours)(5.0, 7)
    if kind.startswith("RNNCell"):
        with pytest.raises(ValueError, match="nonlinearity must be 'tanh' or 'relu', got 'gelu'"):
            rnnattn_ext.RNNCell(5, 7, nonlinearity="gelu")
