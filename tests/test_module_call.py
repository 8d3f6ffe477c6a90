"""The modules' calls in C++ (``_ops.run_layers``, ``_ops.run_attention_layers``,
csrc/python_layer_call.cpp): for a one-direction module with a batched tensor it gives what the
functional layers give, bit for bit, forward and gradients, one layer or several (but for the
slots a float32 stream carries without gradients, which the engine's own one-step product
computes: the same to rounding); it hands back (None) whatever the general path must take, and
that path then runs it; errors raised by the op keep their Python type and message; __torch_function__
and __torch_dispatch__ see what they would see through torch.ops."""

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import rnnattn_ext
from rnnattn_ext import _ops, functional

from conftest import device_params

MODULES = {
    "lstm": lambda: rnnattn_ext.LSTM(5, 7),
    "lstm_proj": lambda: rnnattn_ext.LSTM(5, 7, proj_size=3),
    "gru": lambda: rnnattn_ext.GRU(5, 7),
    "rnn_tanh": lambda: rnnattn_ext.RNN(5, 7),
    "rnn_relu_no_bias": lambda: rnnattn_ext.RNN(5, 7, nonlinearity="relu", bias=False),
}


def _module(name, device, dtype=torch.float64, batch_first=False, table=MODULES):
    """table[name]() (seeded) on device and dtype, time-major or batch-first."""
    torch.manual_seed(0)
    module = table[name]().to(device=device, dtype=dtype)
    module.batch_first = batch_first
    return module


def _states(module, batch, device, dtype):
    widths = module._state_widths()
    states = [torch.randn(module.num_layers, batch, w, device=device, dtype=dtype) for w in widths]
    return tuple(states) if len(states) == 2 else states[0]


def _call_args(module, x, hx, lengths=None):
    call = module._layer_call()
    return (module.cell, x, hx, module.input_size, call.widths, module.batch_first, module, call.names,
            call.directions, lengths, module._dropout_between_layers())


def _through_functional(module, x, hx):
    """What the module's one-layer call computes, through functional.layer (torch.ops)."""
    xt = x.transpose(0, 1) if module.batch_first else x
    if hx is None:
        states = [xt.new_zeros(xt.shape[1], width) for width in module._state_widths()]
    else:
        states = [s[0] for s in (hx if isinstance(hx, tuple) else (hx,))]
    w_ih, w_hh, b_ih, b_hh, *w_hr = module._weights_of(0, module._layer_parts())
    output, finals = functional.layer(module.cell, xt, states, w_ih, w_hh, b_ih, b_hh,
                                      weight_hr=w_hr[0] if w_hr else None)
    return output.transpose(0, 1) if module.batch_first else output, [f.unsqueeze(0) for f in finals]


def _flat(result):
    output, finals = result
    return [output, *(finals if isinstance(finals, (tuple, list)) else [finals])]


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("name", sorted(MODULES))
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("with_hx", [False, True])
def test_gives_the_functional_layers_bits_forward_and_backward(device, name, batch_first, with_hx):
    module = _module(name, device, batch_first=batch_first)
    x = torch.randn(4, 3, 5, dtype=torch.float64, device=device)
    if batch_first:
        x = x.transpose(0, 1).contiguous()
    hx = _states(module, 3, device, torch.float64) if with_hx else None
    assert _ops.run_layers(*_call_args(module, x, hx)) is not None, "the C++ call was not taken"

    def run(call):
        inputs = [x.detach().requires_grad_()]
        if hx is not None:
            inputs += [s.detach().requires_grad_() for s in (hx if isinstance(hx, tuple) else (hx,))]
        given = None if hx is None else (tuple(inputs[1:]) if isinstance(hx, tuple) else inputs[1])
        module.zero_grad()
        outputs = _flat(call(inputs[0], given))
        torch.manual_seed(1)
        sum(((o * torch.randn_like(o)).sum() for o in outputs)).backward()
        grads = [t.grad for t in inputs] + [p.grad for p in module.parameters()]
        return [o.detach() for o in outputs], grads

    ours, ours_grads = run(lambda xi, h: module(xi, h))
    expected, expected_grads = run(lambda xi, h: _through_functional(module, xi, h))
    for a, b in zip(ours + ours_grads, expected + expected_grads):
        assert a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("grad_mode", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_calls_without_grad_give_plain_tensors(name, grad_mode):
    """Without grad mode the C++ call makes its views of hx (each layer's states) and of the op's
    final states (h_n, c_n of one layer) below autograd: the results are the grad-mode call's numbers,
    plain tensors that a later in-place change or graph takes as any other, and hx (requiring grad
    here) is left as it was."""
    module = _module(name, "cpu")
    x = torch.randn(3, 2, 5, dtype=torch.float64)
    hx = _states(module, 2, "cpu", torch.float64)
    leaves = [s.requires_grad_() for s in (hx if isinstance(hx, tuple) else (hx,))]
    before = [s.detach().clone() for s in leaves]
    expected = [t.detach() for t in _flat(module(x, hx))]
    with grad_mode():
        assert _ops.run_layers(*_call_args(module, x, hx)) is not None, "the C++ call was not taken"
        got = _flat(module(x, hx))
        for g in got[1:]:
            g.add_(0.0)  # an in-place change of a final state, as a streaming loop may make
    for a, b in zip(got, expected):
        assert not a.requires_grad and a.shape == b.shape and torch.equal(a, b)
    for s, b in zip(leaves, before):
        assert s.requires_grad and torch.equal(s.detach(), b)
    if grad_mode is torch.no_grad:  # (inference tensors cannot enter a graph)
        weight = torch.ones(1, dtype=torch.float64, requires_grad=True)
        (got[1] * weight).sum().backward()
        assert torch.equal(weight.grad, got[1].sum().reshape(1))


STACKED_MODULES = {
    "lstm_proj_2": lambda: rnnattn_ext.LSTM(5, 7, num_layers=2, proj_size=3),
    "gru_3_dropout": lambda: rnnattn_ext.GRU(5, 7, num_layers=3, dropout=0.5),  # run in eval: no dropout
    "rnn_relu_2_no_bias": lambda: rnnattn_ext.RNN(5, 7, num_layers=2, nonlinearity="relu", bias=False),
}


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("name", sorted(STACKED_MODULES))
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("with_hx", [False, True])
def test_stacked_layers_give_the_general_paths_bits(device, name, batch_first, with_hx, monkeypatch):
    torch.manual_seed(0)
    module = STACKED_MODULES[name]().to(device=device, dtype=torch.float64).eval()
    module.batch_first = batch_first
    x = torch.randn(4, 3, 5, dtype=torch.float64, device=device)  # T=4, B=3
    x = x.transpose(0, 1).contiguous() if batch_first else x
    widths = module._state_widths()
    hx = [torch.randn(module.num_layers, 3, w, dtype=torch.float64, device=device) for w in widths]
    leaves = [x.clone().requires_grad_()] + ([h.clone().requires_grad_() for h in hx] if with_hx else [])

    def call(xi, *states):
        given = None if not states else (tuple(states) if len(states) == 2 else states[0])
        return _flat(module(xi, given))

    assert _ops.run_layers(*_call_args(module, x, None)) is not None, "the C++ call was not taken"
    ours = _attention_run(module, call, leaves)
    monkeypatch.setattr(_ops, "run_layers", lambda *args, **kwargs: None)
    expected = _attention_run(module, call, leaves)
    _assert_same_bits(ours[0] + ours[1], expected[0] + expected[1])


def _general_path_bits(module, x, monkeypatch, leaves=()):
    """The module's output and its parameters' (and leaves') gradients through the C++ call, then
    through the general path."""
    def run():
        module.zero_grad()
        for leaf in leaves:
            leaf.grad = None
        output, _ = module(x)
        output.square().sum().backward()
        return [output.detach()] + [p.grad.clone() for p in module.parameters()] + [t.grad.clone() for t in leaves]

    with monkeypatch.context() as patch:
        ours = run()
        patch.setattr(_ops, "run_layers", lambda *args, **kwargs: None)
        patch.setattr(_ops, "run_attention_layers", lambda *args, **kwargs: None)
        expected = run()
    return ours, expected


def test_parametrized_weights_are_read_through_the_parametrization(monkeypatch):
    # weight_norm replaces weight_hh_l1 by a property computed from two parameters of its own: the
    # C++ call reads the module's attribute, and the gradients reach those parameters.
    from torch.nn.utils import parametrizations

    torch.manual_seed(0)
    module = rnnattn_ext.LSTM(5, 7, num_layers=2).double()
    parametrizations.weight_norm(module, "weight_hh_l1")
    assert "weight_hh_l1" not in module._parameters
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    assert _ops.run_layers(*_call_args(module, x, None)) is not None, "the C++ call was not taken"
    ours, expected = _general_path_bits(module, x, monkeypatch)
    _assert_same_bits(ours, expected)
    assert module.parametrizations.weight_hh_l1.original1.grad is not None


@pytest.mark.parametrize("make", [lambda: rnnattn_ext.GRU(5, 7, num_layers=2),
                                  lambda: rnnattn_ext.AttnGRU(5, 7, num_layers=2, num_heads=1, window=2)],
                         ids=["GRU", "AttnGRU"])
def test_a_parameter_replaced_after_a_call_is_the_one_used(make, monkeypatch):
    # The module works out its parameters' names once; the tensors are read at every call.
    torch.manual_seed(0)
    module = make().double()
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    before, _ = module(x)
    module.weight_hh_l1 = torch.nn.Parameter(torch.randn_like(module.weight_hh_l1))
    module.bias_ih_l0 = torch.nn.Parameter(torch.randn_like(module.bias_ih_l0))
    ours, expected = _general_path_bits(module, x, monkeypatch)
    _assert_same_bits(ours, expected)
    assert not torch.equal(ours[0], before.detach())


def _taken_and_general_bits(module, call, leaves, monkeypatch, c_call="run_layers"):
    """call(*leaves)'s outputs and gradients (``_attention_run``) through the C++ call (``_ops.<c_call>``),
    which it must take, then through the general path, from the same random state (dropout draws the
    same numbers)."""
    taken = []
    real = getattr(_ops, c_call)
    with monkeypatch.context() as patch:
        patch.setattr(_ops, c_call, lambda *args: taken.append(real(*args)) or taken[-1])
        torch.manual_seed(5)
        ours = _attention_run(module, call, leaves)
    assert taken and all(t is not None for t in taken), "the C++ call was not taken"
    with monkeypatch.context() as patch:
        patch.setattr(_ops, c_call, lambda *args: None)
        torch.manual_seed(5)
        expected = _attention_run(module, call, leaves)
    return ours[0] + ours[1], expected[0] + expected[1]


def _leaves_and_call(module, x, with_hx, batch, **kwargs):
    """Leaves (x and, with_hx, h_0 [and c_0]) and a call of the module on them with kwargs that
    returns [output (or a PackedSequence's data), h_n (, c_n)]."""
    from torch.nn.utils.rnn import PackedSequence

    widths = module._state_widths()
    entries = module.num_layers * (2 if module.bidirectional else 1)
    hx = [torch.randn(entries, batch, w, dtype=x.dtype, device=x.device) for w in widths] if with_hx else []
    leaves = [x.clone().requires_grad_()] + [h.requires_grad_() for h in hx]

    def call(xi, *states):
        given = None if not states else (tuple(states) if len(states) == 2 else states[0])
        if "packed" in kwargs:
            xi = PackedSequence(xi, *kwargs["packed"][1:])
        output, finals = module(xi, given, **{k: v for k, v in kwargs.items() if k != "packed"})
        return [output.data if isinstance(output, PackedSequence) else output,
                *(finals if isinstance(finals, tuple) else (finals,))]

    return leaves, call


BIDIRECTIONAL_MODULES = {
    "lstm_bi": lambda: rnnattn_ext.LSTM(5, 7, bidirectional=True),
    "lstm_proj_bi_2": lambda: rnnattn_ext.LSTM(5, 7, num_layers=2, proj_size=3, bidirectional=True),
    "gru_bi_3": lambda: rnnattn_ext.GRU(5, 7, num_layers=3, bidirectional=True),
    "rnn_relu_bi_2_no_bias": lambda: rnnattn_ext.RNN(5, 7, num_layers=2, nonlinearity="relu", bias=False,
                                                     bidirectional=True),
}


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("name", sorted(BIDIRECTIONAL_MODULES))
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("with_hx", [False, True])
def test_bidirectional_layers_give_the_general_paths_bits(device, name, batch_first, with_hx, monkeypatch):
    # Both directions of every layer through the op, the next layer reading them side by side; the
    # final states of layer l, direction d at l * 2 + d, as torch.nn.
    module = _module(name, device, batch_first=batch_first, table=BIDIRECTIONAL_MODULES)
    x = torch.randn(4, 3, 5, dtype=torch.float64, device=device)
    leaves, call = _leaves_and_call(module, x, with_hx, batch=4 if batch_first else 3)
    _assert_same_bits(*_taken_and_general_bits(module, call, leaves, monkeypatch))


@pytest.mark.parametrize("name", ["gru_3_dropout", "gru_bi_3"])
def test_dropout_between_layers_in_training_gives_the_general_paths_bits(name, monkeypatch):
    # The same ATen dropout as functional.stack's, in the same order: the same mask from the same seed.
    table = {**STACKED_MODULES, "gru_bi_3": lambda: rnnattn_ext.GRU(5, 7, num_layers=3, dropout=0.5,
                                                                     bidirectional=True)}
    module = _module(name, "cpu", table=table).train()
    assert module.dropout > 0 and module._dropout_between_layers() == module.dropout
    leaves, call = _leaves_and_call(module, torch.randn(6, 3, 5, dtype=torch.float64), True, batch=3)
    ours, expected = _taken_and_general_bits(module, call, leaves, monkeypatch)
    _assert_same_bits(ours, expected)
    torch.manual_seed(6)
    assert not torch.equal(call(*leaves)[0], ours[0]), "another seed, the same dropout: no dropout ran"
    module.eval()
    assert module._dropout_between_layers() == 0.0


LENGTHS_MODULES = {
    "lstm": lambda: rnnattn_ext.LSTM(5, 7),
    "lstm_proj_bi_2": BIDIRECTIONAL_MODULES["lstm_proj_bi_2"],
    "gru_bi_3_dropout": lambda: rnnattn_ext.GRU(5, 7, num_layers=3, dropout=0.5, bidirectional=True),
    "rnn_tanh_2": lambda: rnnattn_ext.RNN(5, 7, num_layers=2),
}


@pytest.mark.parametrize("name", sorted(LENGTHS_MODULES))
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("with_hx", [False, True])
def test_lengths_give_the_general_paths_bits(name, batch_first, with_hx, monkeypatch):
    # CPU lengths, unsorted (a row of every length but the longest's start the reverse direction late).
    module = _module(name, "cpu", batch_first=batch_first, table=LENGTHS_MODULES).train()
    x = torch.randn(5, 4, 5, dtype=torch.float64)
    lengths = torch.tensor([3, 5, 1, 4]) if not batch_first else torch.tensor([3, 4, 1, 4, 2])
    leaves, call = _leaves_and_call(module, x, with_hx, batch=lengths.numel(), lengths=lengths)
    _assert_same_bits(*_taken_and_general_bits(module, call, leaves, monkeypatch))


@pytest.mark.parametrize("name", sorted(LENGTHS_MODULES))
@pytest.mark.parametrize("enforce_sorted", [False, True])
@pytest.mark.parametrize("with_hx", [False, True])
def test_packed_sequences_give_the_general_paths_bits(name, enforce_sorted, with_hx, monkeypatch):
    # The C++ call pads and packs by rows itself; hx and the final states in the caller's order.
    from torch.nn.utils.rnn import pack_padded_sequence

    module = _module(name, "cpu", table=LENGTHS_MODULES).train()
    lengths = torch.tensor([5, 4, 4, 2, 1]) if enforce_sorted else torch.tensor([2, 5, 1, 4, 4])
    packed = pack_padded_sequence(torch.randn(5, 5, 5, dtype=torch.float64), lengths, enforce_sorted=enforce_sorted)
    leaves, call = _leaves_and_call(module, packed.data, with_hx, batch=5, packed=packed)
    _assert_same_bits(*_taken_and_general_bits(module, call, leaves, monkeypatch))


def test_hands_back_packed_sequences_the_general_path_must_take():
    # A PackedSequence made by hand that pack_padded_sequence would not make, or one it cannot take
    # in C++, goes to the general path (whose errors name what is wrong), the same as before.
    from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

    module = _module("gru", "cpu", dtype=torch.float32)
    packed = pack_padded_sequence(torch.randn(4, 3, 5), torch.tensor([4, 2, 3]), enforce_sorted=False)
    call = module._layer_call()

    def taken(p):
        return _ops.run_layers(module.cell, p, None, 5, call.widths, False, module, call.names, 1, None, 0.0)

    assert taken(packed) is not None
    data, sizes = packed.data, packed.batch_sizes
    malformed = {
        "rising batch sizes": PackedSequence(data, torch.tensor([2, 3, 2, 2])),
        "a zero batch size": PackedSequence(data[:7], torch.tensor([3, 2, 2, 0])),
        "sizes not adding up to the rows": PackedSequence(data[:8], sizes),
        "int32 batch sizes": PackedSequence(data, sizes.int()),
        "an order of another batch": PackedSequence(data, sizes, torch.tensor([1, 0]), torch.tensor([1, 0])),
        "bfloat16 data": PackedSequence(data.bfloat16(), sizes, packed.sorted_indices, packed.unsorted_indices),
        "3-D data": PackedSequence(data.unsqueeze(0), sizes),
    }
    for what, p in malformed.items():
        assert taken(p) is None, what
    with pytest.raises(RuntimeError):
        module(malformed["sizes not adding up to the rows"])


def _calls_to_hand_back(x, hx):
    """(input, hx) of an LSTM-like module's calls that the C++ call leaves to the general path."""
    return {
        "unbatched input": (x[:, 0], None),
        "no time step": (x[:0], None),
        "another input width": (torch.randn(4, 3, 6), None),
        "h_0 alone for an LSTM": (x, hx[0]),
        "h_0 of another batch": (x, (hx[0][:, :2], hx[1])),
        "bfloat16 on the CPU": (x.bfloat16(), None),
    }


def test_hands_back_what_the_general_path_must_take():
    module = _module("lstm", "cpu", dtype=torch.float32)
    x = torch.randn(4, 3, 5)
    hx = _states(module, 3, "cpu", torch.float32)
    cases = {
        **_calls_to_hand_back(x, hx),
        "three states": (x, (*hx, hx[0])),
        "2-D h_0": (x, (hx[0][0], hx[1])),
        "h_0 of two layers for one": (x, (hx[0].expand(2, 3, 7), hx[1].expand(2, 3, 7))),
    }
    for what, (inp, given) in cases.items():
        assert _ops.run_layers(*_call_args(module, inp, given)) is None, what
    # Lengths the module converts (a list, int32) or explains (out of [1, T], another shape).
    for lengths in ([4, 4, 4], torch.tensor([4, 4, 4], dtype=torch.int32), torch.tensor([0, 4, 4]),
                    torch.tensor([4, 5, 4]), torch.tensor([4, 4]), torch.tensor([[4, 4, 4]])):
        assert _ops.run_layers(*_call_args(module, x, None, lengths)) is None, lengths
    assert _ops.run_layers(*_call_args(module, x, None, torch.tensor([4, 1, 2]))) is not None
    with pytest.raises(ValueError, match=r"LSTM: lengths must lie in \[1, T\] = \[1, 4\], got values in \[0, 4\]"):
        module(x, lengths=torch.tensor([0, 4, 4]))

    class Subclass(torch.Tensor):
        pass

    assert _ops.run_layers(*_call_args(module, x.as_subclass(Subclass), None)) is None

    class Recording(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.calls.append(func)
            return func(*args, **(kwargs or {}))

    with Recording() as mode:
        assert _ops.run_layers(*_call_args(module, x, None)) is None
        output, _ = module(x)
    assert torch.ops.rnnattn.lstm_forward.default in mode.calls
    torch.testing.assert_close(output, module(x)[0], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_takes_reduced_precision_on_the_cpu_as_functional_computes_it(name, dtype):
    """The base ops compute CPU float16/bfloat16 themselves, so the C++ call takes such a module's call
    as it takes a float32 one's, and gives functional.layer's numbers bit for bit."""
    module = _module(name, "cpu", dtype=dtype)
    x = torch.randn(4, 3, 5).to(dtype)
    taken = _ops.run_layers(*_call_args(module, x, None))
    assert taken is not None
    output, finals = _through_functional(module, x, None)
    assert taken[0].dtype == dtype
    torch.testing.assert_close(taken[0], output, rtol=0, atol=0)
    for got, expected in zip(taken[1], finals):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_the_general_path_runs_what_it_hands_back():
    module = _module("gru", "cpu", dtype=torch.float32)
    x = torch.randn(4, 3, 5)
    output, h_n = module(x[:, 0])  # unbatched
    expected, expected_h = module(x[:, :1])
    torch.testing.assert_close(output, expected[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(h_n, expected_h[:, 0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="expected h_0 of size"):
        module(x, torch.zeros(1, 2, 7))
    half = module.to(torch.bfloat16)(x.bfloat16())[0]
    assert half.dtype == torch.bfloat16


def test_the_ops_errors_keep_their_type_and_message():
    module = _module("gru", "cpu", dtype=torch.float32)
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    with pytest.raises(TypeError) as through_functional:
        _through_functional(module, x, None)
    with pytest.raises(TypeError) as through_module:
        module(x)
    # The module names what does not fit in its own terms (the input here); the op's error, raised
    # through the C++ layer call, is its cause, as the functional path raises it.
    assert "GRU: input must have the parameters' dtype" in str(through_module.value)
    assert str(through_module.value.__cause__) == str(through_functional.value)
    assert "weight_" in str(through_functional.value) and "dtype" in str(through_functional.value)


class _RecordingDispatch(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append(func)
        return func(*args, **(kwargs or {}))


# A module of each C++ call and the op it runs.
CALL_CASES = {
    "rnn_tanh": (lambda: _module("rnn_tanh", "cpu", dtype=torch.float32), "rnn_tanh_forward"),
    "lstm": (lambda: _module("lstm", "cpu", dtype=torch.float32), "lstm_forward"),
    "gru_2_layers": (lambda: rnnattn_ext.GRU(5, 7, num_layers=2), "gru_forward"),
    "attn_lstm": (lambda: _attention_module("attn_lstm_window3", "cpu", dtype=torch.float32), "lstm_attn_forward"),
}


@pytest.mark.parametrize("name", sorted(CALL_CASES))
def test_dispatch_modes_see_the_op(name):
    make, op = CALL_CASES[name]
    module = make().eval()
    x = torch.randn(4, 3, 5)
    with _RecordingDispatch() as mode:
        output, _ = module(x)
    assert getattr(torch.ops.rnnattn, op).default in mode.calls
    torch.testing.assert_close(output, module(x)[0], rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(CALL_CASES))
def test_jit_trace_records_the_op(name):
    make, op = CALL_CASES[name]
    module = make().eval()
    with torch.no_grad():
        traced = torch.jit.trace(module, (torch.randn(4, 3, 5),))
        assert f"rnnattn::{op}" in str(traced.graph)
        other = torch.randn(6, 2, 5)
        torch.testing.assert_close(traced(other)[0], module(other)[0], rtol=0, atol=0)


# The attention modules' call (``_ops.run_attention_layers``): forward and streaming.

ATTENTION_MODULES = {
    "attn_lstm_window3": lambda: rnnattn_ext.AttnLSTM(5, 8, num_heads=2, head_dim=3, window=3),
    "attn_lstm_proj_unbounded": lambda: rnnattn_ext.AttnLSTM(5, 8, num_heads=2, head_dim=3, proj_size=4),
    "attn_gru_window1": lambda: rnnattn_ext.AttnGRU(5, 8, num_heads=1, head_dim=4, window=1),
    "attn_rnn_relu_no_bias_memory": lambda: rnnattn_ext.AttnRNN(5, 8, nonlinearity="relu", bias=False, num_heads=2,
                                                                head_dim=3, memory_size=6),
    "attn_gru_memory": lambda: rnnattn_ext.AttnGRU(5, 8, num_heads=2, head_dim=2, memory_size=6),
    "attn_lstm_2_layers_window2": lambda: rnnattn_ext.AttnLSTM(5, 8, num_layers=2, num_heads=2, head_dim=3, window=2),
    "attn_gru_2_layers_memory_dropout_eval": lambda: rnnattn_ext.AttnGRU(5, 8, num_layers=2, dropout=0.5, num_heads=2,
                                                                         head_dim=2, memory_size=6).eval(),
}


def _attention_module(name, device, dtype=torch.float64, batch_first=False):
    return _module(name, device, dtype, batch_first, table=ATTENTION_MODULES)


ATTENTION_FORWARD_MODULES = {
    "attn_lstm_bi_window3": lambda: rnnattn_ext.AttnLSTM(5, 8, num_heads=2, head_dim=3, window=3, bidirectional=True),
    "attn_gru_bi_2_memory_dropout": lambda: rnnattn_ext.AttnGRU(5, 8, num_layers=2, dropout=0.5, num_heads=2,
                                                                head_dim=2, memory_size=6, bidirectional=True),
    "attn_rnn_2_unbounded_dropout": lambda: rnnattn_ext.AttnRNN(5, 8, num_layers=2, dropout=0.5, num_heads=2,
                                                                head_dim=3),
}


@pytest.mark.parametrize("name", sorted(ATTENTION_FORWARD_MODULES))
@pytest.mark.parametrize("with_lengths", [False, True])
def test_attention_directions_lengths_and_dropout_give_the_general_paths_bits(name, with_lengths, monkeypatch):
    # In training: the dropout between layers draws the same numbers from the same seed.
    module = _module(name, "cpu", table=ATTENTION_FORWARD_MODULES).train()
    x = torch.randn(5, 3, 5, dtype=torch.float64)
    lengths = torch.tensor([3, 5, 2]) if with_lengths else None
    memory, memory_lengths = _memory_args(module, 3, "cpu", torch.float64)
    leaves = [x.clone().requires_grad_()] + ([memory.clone().requires_grad_()] if memory is not None else [])

    def call(xi, *mem):
        output, state = module(xi, memory=mem[0] if mem else None, memory_lengths=memory_lengths, lengths=lengths)
        return [output, *(state if isinstance(state, tuple) else (state,))]

    assert module._run_attention_layers(x, None, memory, memory_lengths, lengths=lengths) is not None
    _assert_same_bits(*_taken_and_general_bits(module, call, leaves, monkeypatch, "run_attention_layers"))


@pytest.mark.parametrize("name", sorted(ATTENTION_FORWARD_MODULES) + ["attn_gru_memory"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_attention_packed_sequences_give_the_general_paths_bits(name, batch_first, monkeypatch):
    # The rows of hx, memory and memory_lengths taken in the packed order, the final states given back
    # in the caller's; the memory in the module's layout (batch-first with batch_first), as ever.
    from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

    table = {**ATTENTION_FORWARD_MODULES, "attn_gru_memory": ATTENTION_MODULES["attn_gru_memory"]}
    module = _module(name, "cpu", batch_first=batch_first, table=table).train()
    packed = pack_padded_sequence(torch.randn(5, 3, 5, dtype=torch.float64), torch.tensor([2, 5, 4]),
                                  enforce_sorted=False)
    memory, memory_lengths = _memory_args(module, 3, "cpu", torch.float64)
    hx = _states(module, 3, "cpu", torch.float64)
    if module.bidirectional:
        hx = tuple(torch.cat([s, s + 1]) for s in hx) if isinstance(hx, tuple) else torch.cat([hx, hx + 1])
    states = list(hx) if isinstance(hx, tuple) else [hx]
    leaves = [packed.data.clone().requires_grad_(), *[s.clone().requires_grad_() for s in states]]
    leaves += [memory.clone().requires_grad_()] if memory is not None else []

    def call(data, *rest):
        rest = list(rest)
        mem = rest.pop() if memory is not None else None
        given = tuple(rest) if len(rest) == 2 else rest[0]
        output, state = module(PackedSequence(data, *packed[1:]), given, memory=mem, memory_lengths=memory_lengths)
        return [output.data, *(state if isinstance(state, tuple) else (state,))]

    assert module._run_attention_layers(packed, hx, memory, memory_lengths) is not None, "the C++ call was not taken"
    _assert_same_bits(*_taken_and_general_bits(module, call, leaves, monkeypatch, "run_attention_layers"))


def test_attention_stream_in_training_carries_the_slots_before_dropout(monkeypatch):
    # Each layer's carried slots come from its output before the dropout the next layer reads.
    module = _module("attn_rnn_2_unbounded_dropout", "cpu", table=ATTENTION_FORWARD_MODULES).train()
    module.window = 3
    x = torch.randn(6, 2, 5, dtype=torch.float64)

    def streamed():
        torch.manual_seed(5)
        outputs, state = [], None
        for chunk in (x[:2], x[2:3], x[3:]):
            output, state = module.stream(chunk, state)
            outputs.append(output)
        return [*outputs, state.h, *state.keys, *state.values]

    assert module._run_attention_layers(x[:2], None, None, None, carry_slots=True) is not None
    ours = streamed()
    monkeypatch.setattr(_ops, "run_attention_layers", lambda *args, **kwargs: None)
    _assert_same_bits([t.detach() for t in ours], [t.detach() for t in streamed()])


def _memory_args(module, batch, device, dtype):
    """memory (in the module's layout) and memory_lengths for an external-memory module, else None."""
    if module.memory_size is None:
        return None, None
    memory = torch.randn(4, batch, module.memory_size, device=device, dtype=dtype)
    if module.batch_first:
        memory = memory.transpose(0, 1).contiguous()
    return memory, torch.tensor([4, 2, 3][:batch], device=device)


def _attention_run(module, call, leaves):
    """Outputs of call(*leaves) (detached) and the gradients of a random projection of them with
    respect to the leaves and the module's parameters."""
    for leaf in leaves:
        leaf.grad = None
    module.zero_grad()
    outputs = [o for o in call(*leaves) if o is not None]
    torch.manual_seed(1)
    sum(((o * torch.randn_like(o)).sum() for o in outputs)).backward()
    grads = [t.grad for t in leaves] + [p.grad for p in module.parameters()]
    return [o.detach() for o in outputs], grads


def _assert_same_bits(ours, expected):
    assert len(ours) == len(expected)
    for a, b in zip(ours, expected):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("name", sorted(ATTENTION_MODULES))
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("with_hx", [False, True])
def test_attention_forward_gives_the_general_paths_bits(device, name, batch_first, with_hx, monkeypatch):
    module = _attention_module(name, device, batch_first=batch_first)
    x = torch.randn(3, 5, 5, dtype=torch.float64, device=device)  # (B, T, I) or (T, B, I): 3 is B only batch-first
    x = x if batch_first else x.transpose(0, 1).contiguous()
    hx = _states(module, 3, device, torch.float64) if with_hx else None
    memory, memory_lengths = _memory_args(module, 3, device, torch.float64)
    leaves = [x.clone().requires_grad_()]
    if hx is not None:
        leaves += [s.clone().requires_grad_() for s in (hx if isinstance(hx, tuple) else (hx,))]
    if memory is not None:
        leaves.append(memory.clone().requires_grad_())

    def call(*args):
        xi, rest = args[0], list(args[1:])
        mem = rest.pop() if memory is not None else None
        given = None if hx is None else (tuple(rest) if isinstance(hx, tuple) else rest[0])
        output, state = module(xi, given, memory=mem, memory_lengths=memory_lengths)
        return [output, *(state if isinstance(state, tuple) else (state,))]

    assert module._run_attention_layers(x, hx, memory, memory_lengths) is not None, "the C++ call was not taken"
    ours = _attention_run(module, call, leaves)
    monkeypatch.setattr(_ops, "run_attention_layers", lambda *args, **kwargs: None)
    expected = _attention_run(module, call, leaves)
    _assert_same_bits(ours[0] + ours[1], expected[0] + expected[1])


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("name", sorted(ATTENTION_MODULES))
@pytest.mark.parametrize("batch_first", [False, True])
def test_attention_stream_gives_the_general_paths_bits(device, name, batch_first, monkeypatch):
    """Chunks of 2, 1 and 3 steps (the carried slots grow, are cut to the window and run through the
    next chunk), with gradients flowing back through the carried states and slots."""
    module = _attention_module(name, device, batch_first=batch_first)
    x = torch.randn(6, 2, 5, dtype=torch.float64, device=device)
    memory, memory_lengths = _memory_args(module, 2, device, torch.float64)
    time_dim = 1 if batch_first else 0
    x = x.transpose(0, 1).contiguous() if batch_first else x
    leaves = [x.clone().requires_grad_()] + ([memory.clone().requires_grad_()] if memory is not None else [])

    def call(xi, *mem):
        outputs, state = [], None
        for chunk in (xi.narrow(time_dim, 0, 2), xi.narrow(time_dim, 2, 1), xi.narrow(time_dim, 3, 3)):
            output, state = module.stream(chunk, state, memory=mem[0] if mem else None, memory_lengths=memory_lengths)
            outputs.append(output)
        carried = [t for slots in (state.keys or []) + (state.values or []) if slots is not None for t in [slots]]
        return [*outputs, state.h, state.c, *carried]

    assert module._run_attention_layers(x, None, memory, memory_lengths,
                                       carry_slots=module.memory_size is None) is not None
    ours = _attention_run(module, call, leaves)
    monkeypatch.setattr(_ops, "run_attention_layers", lambda *args, **kwargs: None)
    expected = _attention_run(module, call, leaves)
    _assert_same_bits(ours[0] + ours[1], expected[0] + expected[1])


def _stream_chunks(module, x, chunks, memory=None, memory_lengths=None):
    """Streams x (time-major) chunk by chunk under no_grad: per chunk [output, h, c, keys..., values...]."""
    results, state, start = [], None, 0
    with torch.no_grad():
        for size in chunks:
            output, state = module.stream(x[start : start + size], state, memory=memory, memory_lengths=memory_lengths)
            start += size
            carried = [t for slots in (state.keys or []) + (state.values or []) if slots is not None for t in [slots]]
            results.append([output, state.h, state.c, *carried])
    return results


def test_attention_stream_carries_what_the_general_path_carries(monkeypatch):
    # One step at a time in inference, float32, window 3: the carried slots' layout and count, and
    # their values, which the C++ call writes with the engine's own one-step product (the general
    # path's torch.nn.functional.linear sums in another order: the same to rounding).
    torch.manual_seed(0)
    module = rnnattn_ext.AttnLSTM(5, 8, num_heads=2, head_dim=3, window=3).eval()
    x = torch.randn(7, 2, 5)
    assert module._run_attention_layers(x[:1], None, None, None, carry_slots=True) is not None
    ours = _stream_chunks(module, x, [1] * 7)
    for t, step in enumerate(ours):
        keys = step[3]
        assert keys.shape == (min(t + 1, 2), 2, 6) and not keys.requires_grad
    assert all(torch.equal(a, b) for step_a, step_b in zip(ours, _stream_chunks(module, x, [1] * 7))
               for a, b in zip(step_a, step_b)), "not the same bits run to run"
    monkeypatch.setattr(_ops, "run_attention_layers", lambda *args, **kwargs: None)
    for step_ours, step_general in zip(ours, _stream_chunks(module, x, [1] * 7)):
        for a, b in zip(step_ours, step_general):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(ATTENTION_MODULES))
@pytest.mark.parametrize("batch", [1, 2, 6])
def test_attention_stream_without_gradients_gives_the_general_paths_bits(name, batch, monkeypatch):
    """No gradient recorded: the C++ call writes the carried slots straight into their tensors
    (float64: through ATen's product, as the general path's linear). Chunks of 2, 1 and 3 steps grow
    the slots, cut them to the window and carry more than a chunk; a batch of 6 is more rows than
    the one-step product takes."""
    module = _attention_module(name, "cpu")
    x = torch.randn(6, batch, 5, dtype=torch.float64)
    memory, memory_lengths = _memory_args(module, batch, "cpu", torch.float64)
    if memory_lengths is not None and batch > 3:
        memory_lengths = torch.full((batch,), 3)
    assert module._run_attention_layers(x[:1], None, memory, memory_lengths,
                                       carry_slots=module.memory_size is None) is not None
    ours = _stream_chunks(module, x, [2, 1, 3], memory, memory_lengths)
    monkeypatch.setattr(_ops, "run_attention_layers", lambda *args, **kwargs: None)
    for step_ours, step_general in zip(ours, _stream_chunks(module, x, [2, 1, 3], memory, memory_lengths)):
        _assert_same_bits(step_ours, step_general)


def test_attention_call_hands_back_what_the_general_path_must_take():
    module = _attention_module("attn_lstm_window3", "cpu", dtype=torch.float32)
    x = torch.randn(4, 3, 5)
    hx = _states(module, 3, "cpu", torch.float32)
    cases = _calls_to_hand_back(x, hx)
    for what, (inp, given) in cases.items():
        assert module._run_attention_layers(inp, given, None, None) is None, what

    class Subclass(torch.Tensor):
        pass

    assert module._run_attention_layers(x.as_subclass(Subclass), None, None, None) is None
    past = torch.randn(2, 3, 6)
    assert module._run_attention_layers(x, None, None, None, [past.as_subclass(Subclass)], [past]) is None
    for lengths in ([4, 4, 4], torch.tensor([4, 4, 4], dtype=torch.int32), torch.tensor([0, 4, 4])):
        assert module._run_attention_layers(x, None, None, None, lengths=lengths) is None, lengths
    # Streaming carries one direction's slots only.
    bidirectional = rnnattn_ext.AttnGRU(5, 8, bidirectional=True, num_heads=2, head_dim=3)
    assert bidirectional._run_attention_layers(x, None, None, None) is not None
    assert bidirectional._run_attention_layers(x, None, None, None, carry_slots=True) is None
    # need_weights takes the general path; it still gives the C++ call's output.
    output, _ = module(x)
    torch.testing.assert_close(module(x, need_weights=True)[0], output, rtol=0, atol=0)


def test_attention_errors_keep_their_type_and_message(monkeypatch):
    module = _attention_module("attn_gru_memory", "cpu", dtype=torch.float32)
    x = torch.randn(4, 3, 5)
    bad = {
        "memory of another batch": {"memory": torch.randn(4, 2, 6)},
        "no memory": {},
        "memory of another dtype": {"memory": torch.randn(4, 3, 6, dtype=torch.float64)},
    }
    messages = {}
    for what, kwargs in bad.items():
        with pytest.raises((ValueError, TypeError, RuntimeError)) as raised:
            module(x, **kwargs)
        messages[what] = (type(raised.value), str(raised.value))
    monkeypatch.setattr(_ops, "run_attention_layers", lambda *args, **kwargs: None)
    for what, kwargs in bad.items():
        with pytest.raises((ValueError, TypeError, RuntimeError)) as raised:
            module(x, **kwargs)
        assert messages[what] == (type(raised.value), str(raised.value)), what



@pytest.mark.parametrize("make", [lambda: rnnattn_ext.LSTM(5, 7, num_layers=2),
                                  lambda: rnnattn_ext.AttnGRU(5, 7, num_heads=1, window=3)], ids=["LSTM", "AttnGRU"])
def test_functional_call_runs_on_the_tensors_it_is_given(make, monkeypatch):
    # torch.func.functional_call swaps the tensors into the module's _parameters for the call: the
    # C++ call must read those, and the gradients must reach them.
    torch.manual_seed(0)
    module = make().double()
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    given = {name: (p.detach() * 1.5).requires_grad_() for name, p in module.named_parameters()}
    taken = []
    for name in ("run_layers", "run_attention_layers"):
        call = getattr(_ops, name)
        monkeypatch.setattr(_ops, name, lambda *args, call=call, **kwargs: taken.append(call(*args, **kwargs))
                            or taken[-1])
    output, _ = torch.func.functional_call(module, given, (x,))
    assert len(taken) == 1 and taken[0] is not None, "the C++ call was not taken"
    output.sum().backward()
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(1.5)
    expected, _ = module(x)
    torch.testing.assert_close(output, expected, rtol=0, atol=0)
    assert all(t.grad is not None for t in given.values())
    assert all(p.grad is None for p in module.parameters())
