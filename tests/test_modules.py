"""rnnattn_ext.LSTM / GRU / RNN against torch.nn with copied weights: outputs, states, every gradient."""

import itertools
import warnings

import pytest
import torch

import rnnattn_ext


MODULES = {
    "LSTM": (torch.nn.LSTM, rnnattn_ext.LSTM, {}),
    "LSTM_proj": (torch.nn.LSTM, rnnattn_ext.LSTM, {"proj_size": 3}),
    "GRU": (torch.nn.GRU, rnnattn_ext.GRU, {}),
    "RNN_tanh": (torch.nn.RNN, rnnattn_ext.RNN, {"nonlinearity": "tanh"}),
    "RNN_relu": (torch.nn.RNN, rnnattn_ext.RNN, {"nonlinearity": "relu"}),
}


def make_pair(kind, input_size, hidden, device="cpu", dtype=torch.float64, **kwargs):
    torch_cls, our_cls, extra = MODULES[kind]
    theirs = torch_cls(input_size, hidden, **extra, **kwargs).to(device=device, dtype=dtype)
    ours = our_cls(input_size, hidden, **extra, **kwargs).to(device=device, dtype=dtype)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def random_hx(kind, layers, batch, hidden, unbatched, device, dtype):
    def state(width):
        shape = (layers, width) if unbatched else (layers, batch, width)
        return torch.randn(shape, device=device, dtype=dtype, requires_grad=True)

    h = state(MODULES[kind][2].get("proj_size", hidden))  # h is proj_size wide with a projection
    if kind.startswith("LSTM"):
        return (h, state(hidden))
    return h


def flat(result):
    output, hidden = result
    return [output, *(hidden if isinstance(hidden, tuple) else (hidden,))]


def check_against_torch(kind, num_layers, bidirectional, batch_first, batch, steps, with_hx, device="cpu",
                        dtype=torch.float64, unbatched=False, bias=True, atol=1e-9, rtol=1e-7):
    torch.manual_seed(1234)
    input_size, hidden = 5, 7
    theirs, ours = make_pair(kind, input_size, hidden, device, dtype, num_layers=num_layers, bias=bias,
                             batch_first=batch_first, bidirectional=bidirectional)
    layers = num_layers * (2 if bidirectional else 1)
    if unbatched:
        x = torch.randn(steps, input_size, device=device, dtype=dtype)
    elif batch_first:
        x = torch.randn(batch, steps, input_size, device=device, dtype=dtype)
    else:
        x = torch.randn(steps, batch, input_size, device=device, dtype=dtype)
    x.requires_grad_(True)
    hx = random_hx(kind, layers, batch, hidden, unbatched, device, dtype) if with_hx else None
    ref = flat(theirs(x, hx))
    got = flat(ours(x, hx))
    assert len(ref) == len(got)
    for name, a, b in zip(["output", "h_n", "c_n"], got, ref):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m, name=name: f"{name}: {m}")
    weights = [torch.randn_like(t) for t in ref]
    leaves = [x] + (list(hx) if isinstance(hx, tuple) else [hx] if hx is not None else [])
    ref_grads = torch.autograd.grad(sum((t * w).sum() for t, w in zip(ref, weights)), leaves + list(theirs.parameters()))
    got_grads = torch.autograd.grad(sum((t * w).sum() for t, w in zip(got, weights)), leaves + list(ours.parameters()))
    names = ["input"] + [f"hx{i}" for i in range(len(leaves) - 1)] + [n for n, _ in theirs.named_parameters()]
    for name, a, b in zip(names, got_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=atol * 10, rtol=rtol * 10, msg=lambda m, name=name: f"grad {name}: {m}")


GRID = list(itertools.product([1, 2], [False, True], [False, True], [1, 3], [1, 7], [False, True]))


@pytest.mark.parametrize("kind", MODULES)
@pytest.mark.parametrize("num_layers,bidirectional,batch_first,batch,steps,with_hx", GRID)
def test_module_matches_torch_nn(kind, num_layers, bidirectional, batch_first, batch, steps, with_hx):
    check_against_torch(kind, num_layers, bidirectional, batch_first, batch, steps, with_hx)


@pytest.mark.parametrize("kind", MODULES)
@pytest.mark.parametrize("with_hx", [False, True])
def test_unbatched_input(kind, with_hx):
    check_against_torch(kind, 2, True, False, 1, 6, with_hx, unbatched=True)


@pytest.mark.parametrize("kind", MODULES)
def test_without_bias(kind):
    check_against_torch(kind, 2, True, True, 3, 5, True, bias=False)


@pytest.mark.parametrize("kind", MODULES)
def test_float32_matches_torch_nn(kind):
    check_against_torch(kind, 2, True, False, 4, 9, True, dtype=torch.float32, atol=2e-5, rtol=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", MODULES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_cuda_module_matches_torch_nn(kind, dtype):
    tol = {torch.float64: (1e-9, 1e-7), torch.float32: (2e-5, 1e-4)}[dtype]
    for num_layers, bidirectional, batch_first in [(1, False, False), (2, True, True)]:
        # cuDNN's float32 uses TF32 unless told not to; compare against true float32.
        with torch.backends.cudnn.flags(allow_tf32=False):
            check_against_torch(kind, num_layers, bidirectional, batch_first, 3, 7, True, device="cuda",
                                dtype=dtype, atol=tol[0], rtol=tol[1])


@pytest.mark.parametrize("kind", MODULES)
def test_same_initialisation_as_torch_nn(kind):
    torch_cls, our_cls, extra = MODULES[kind]
    torch.manual_seed(0)
    theirs = torch_cls(4, 6, num_layers=2, bidirectional=True, **extra)
    torch.manual_seed(0)
    ours = our_cls(4, 6, num_layers=2, bidirectional=True, **extra)
    assert [n for n, _ in theirs.named_parameters()] == [n for n, _ in ours.named_parameters()]
    for (name, a), (_, b) in zip(theirs.named_parameters(), ours.named_parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("kind", MODULES)
@pytest.mark.parametrize("bias", [True, False])
def test_state_dict_loads_both_ways(kind, bias):
    torch_cls, our_cls, extra = MODULES[kind]
    theirs = torch_cls(3, 5, num_layers=2, bidirectional=True, bias=bias, **extra)
    ours = our_cls(3, 5, num_layers=2, bidirectional=True, bias=bias, **extra)
    ours.load_state_dict(theirs.state_dict())
    theirs2 = torch_cls(3, 5, num_layers=2, bidirectional=True, bias=bias, **extra)
    theirs2.load_state_dict(ours.state_dict())
    for k, v in theirs.state_dict().items():
        assert torch.equal(theirs2.state_dict()[k], v)


@pytest.mark.parametrize("kind", MODULES)
def test_module_follows_dtype_and_repr(kind):
    torch_cls, our_cls, extra = MODULES[kind]
    m = our_cls(3, 5, num_layers=2, **extra).double()
    assert all(p.dtype == torch.float64 for p in m.parameters())
    out, _ = m(torch.randn(4, 2, 3, dtype=torch.float64))
    assert out.dtype == torch.float64
    # torch.nn's repr, plus the nonlinearity when it is not the default (torch.nn omits it).
    relu = ", nonlinearity='relu'" if extra.get("nonlinearity") == "relu" else ""
    assert repr(m) == repr(torch_cls(3, 5, num_layers=2, **extra))[:-1] + relu + ")"


@pytest.mark.parametrize("options", [dict(proj_size=2, num_layers=2, dropout=0.5),
                                     dict(bias=False, batch_first=True, bidirectional=True, proj_size=1)])
def test_repr_reads_as_torch_nn(options):
    # The same arguments in torch.nn's order (LSTM: proj_size right after the sizes).
    assert repr(rnnattn_ext.LSTM(3, 5, **options)) == repr(torch.nn.LSTM(3, 5, **options))
    options.pop("proj_size")
    assert repr(rnnattn_ext.GRU(3, 5, **options)) == repr(torch.nn.GRU(3, 5, **options))


@pytest.mark.parametrize("kind", MODULES)
def test_torch_nn_module_attributes(kind):
    # What code written against torch.nn reads or calls: mode, _flat_weights, flatten_parameters().
    torch.manual_seed(0)
    theirs, ours = make_pair(kind, 3, 5, num_layers=2, bidirectional=True)
    assert ours.mode == theirs.mode
    assert ours._flat_weights_names == theirs._flat_weights_names
    assert len(ours._flat_weights) == len(theirs._flat_weights)
    for a, b in zip(ours._flat_weights, theirs._flat_weights):
        assert a is not None and torch.equal(a, b)
    assert ours._flat_weights[0] is ours.weight_ih_l0
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    before = flat(ours(x))
    assert ours.flatten_parameters() is None
    for a, b in zip(flat(ours(x)), before):
        assert torch.equal(a, b)


def _outcome(fn):
    """What a call gives: ("ok", its result) or ("raises", the exception's type and message)."""
    try:
        return "ok", fn()
    except Exception as error:  # noqa: BLE001 - the exception is the outcome compared
        return "raises", (type(error), str(error))


def _same_outcome(a, b):
    """Whether two outcomes are alike: the same exception and message, or equal results (tensors
    bitwise; a tuple element by element)."""
    if a[0] != b[0] or a[0] == "raises":
        return a == b
    left, right = (r if isinstance(r, tuple) else (r,) for r in (a[1], b[1]))
    return len(left) == len(right) and all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
                                           for x, y in zip(left, right))


# The attention modules have the base modules' checks too (their h and c as the LSTM's).
ARGUMENT_CHECK_KINDS = [*MODULES, "AttnLSTM", "AttnGRU"]


@pytest.mark.parametrize("batch_first", [False, True], ids=["time_major", "batch_first"])
@pytest.mark.parametrize("kind", ARGUMENT_CHECK_KINDS)
def test_torch_nn_argument_checks(kind, batch_first):
    # torch.nn.RNNBase's checks, which a subclass's forward written after torch.nn's calls:
    # check_input, get_expected_hidden_size, check_hidden_size, check_forward_args (LSTM: h and c,
    # get_expected_cell_size) and permute_hidden give torch.nn's results, exceptions and messages.
    torch.manual_seed(0)
    options = {"num_layers": 2, "bidirectional": True, "batch_first": batch_first}
    if kind.startswith("Attn"):
        theirs = getattr(torch.nn, kind[4:])(3, 5, **options)
        ours = getattr(rnnattn_ext, kind)(3, 5, num_heads=1, head_dim=4, **options)
    else:
        theirs, ours = make_pair(kind, 3, 5, dtype=torch.float32, **options)
    lstm = kind.startswith("LSTM") or kind == "AttnLSTM"
    width = MODULES[kind][2].get("proj_size", 5) if kind in MODULES else 5
    batch = 4
    x = torch.randn((batch, 6, 3) if batch_first else (6, batch, 3))
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, [6, 5, 3, 2], batch_first=batch_first)
    good_h, good_c = torch.zeros(4, batch, width), torch.zeros(4, batch, 5)
    inputs = [(x, None), (packed.data, packed.batch_sizes), (x.double(), None), (x[0], None),
              (x.narrow(-1, 0, 2), None), (packed.data, None), (x, packed.batch_sizes)]
    hiddens = [good_h, torch.zeros(4, batch + 1, width), torch.zeros(2, batch, width), torch.zeros(4, batch, width + 1)]
    if lstm:
        hiddens = [(good_h, good_c), (good_h, torch.zeros(4, batch, 6)), (torch.zeros(3, batch, width), good_c)]
    calls = []
    for given, sizes in inputs:
        calls.append(lambda m, given=given, sizes=sizes: m.check_input(given, sizes))
        calls.append(lambda m, given=given, sizes=sizes: m.get_expected_hidden_size(given, sizes))
        if lstm:
            calls.append(lambda m, given=given, sizes=sizes: m.get_expected_cell_size(given, sizes))
        for hidden in hiddens:
            calls.append(lambda m, given=given, sizes=sizes, hidden=hidden: m.check_forward_args(given, hidden, sizes))
    calls.append(lambda m: m.check_hidden_size(torch.zeros(1, 2, 3), (1, 2, 4)))
    calls.append(lambda m: m.check_hidden_size(torch.zeros(1, 2, 3), (1, 2, 4), "wanted {} not {}"))
    calls.append(lambda m: m.check_hidden_size(torch.zeros(1, 2, 3), (1, 2, 3)))
    states = torch.randn(4, batch, width), torch.randn(4, batch, 5)  # distinct rows: a permutation shows
    for permutation in (None, packed.sorted_indices, torch.tensor([3, 1, 0, 2])):
        calls.append(lambda m, p=permutation: m.permute_hidden(states if lstm else states[0], p))

    def under_autocast(m):  # autocast lets another dtype through
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return m.check_input(x.double(), None)

    calls.append(under_autocast)
    mismatched = [i for i, call in enumerate(calls) if not _same_outcome(_outcome(lambda: call(ours)),
                                                                          _outcome(lambda: call(theirs)))]
    assert not mismatched, [(_outcome(lambda: calls[i](ours)), _outcome(lambda: calls[i](theirs))) for i in mismatched]
    # Some of them raise, some pass (the cases reach both sides of each check).
    outcomes = [_outcome(lambda: call(ours))[0] for call in calls]
    assert outcomes.count("raises") >= 10 and outcomes.count("ok") >= 10


@pytest.mark.parametrize("with_hx", [False, True], ids=["no_hx", "hx"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["time_major", "batch_first"])
@pytest.mark.parametrize("kind", MODULES)
def test_one_layer_short_path_equals_the_stack(kind, batch_first, with_hx):
    # One layer in one direction takes a short path (RecurrentBase._run_layers): the general
    # path's numbers, bitwise, and gradients that reach every input.
    torch.manual_seed(0)
    _, ours = make_pair(kind, 3, 5, batch_first=batch_first)
    x = torch.randn((2, 4, 3) if batch_first else (4, 2, 3), dtype=torch.float64, requires_grad=True)
    hx = random_hx(kind, 1, 2, 5, False, "cpu", torch.float64) if with_hx else None
    got = flat(ours(x, hx))
    states = [] if hx is None else list(hx) if isinstance(hx, tuple) else [hx]
    if hx is None:
        widths = [ours.state_size, ours.hidden_size][: 2 if kind.startswith("LSTM") else 1]
        states = [torch.zeros(1, 2, w, dtype=torch.float64) for w in widths]
    time_major = x.transpose(0, 1) if batch_first else x
    out, finals = rnnattn_ext.functional.stack(ours.cell, time_major, states, ours._layer_weights(), 1, False)
    expected = [out.transpose(0, 1) if batch_first else out, *finals]
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    leaves = [x, *(states if with_hx else []), *ours.parameters()]
    assert all(g is not None for g in torch.autograd.grad(sum(t.sum() for t in got), leaves))


def test_proj_size_is_checked():
    for bad in (5, 6, -1):
        with pytest.raises(ValueError, match=f"LSTM: proj_size .*got {bad}"):
            rnnattn_ext.LSTM(3, 5, proj_size=bad)
    with pytest.raises(TypeError, match="proj_size must be an int"):
        rnnattn_ext.LSTM(3, 5, proj_size=2.0)
    m = rnnattn_ext.LSTM(3, 5, proj_size=2)
    with pytest.raises(ValueError, match=r"c_0 of size \(1, 4, 5\), got \(1, 4, 2\)"):
        m(torch.randn(6, 4, 3), (torch.zeros(1, 4, 2), torch.zeros(1, 4, 2)))


@pytest.mark.parametrize("kind", MODULES)
def test_dropout_between_layers(kind):
    _, our_cls, extra = MODULES[kind]
    m = our_cls(3, 16, num_layers=2, dropout=0.5, **extra)
    x = torch.randn(5, 2, 3)
    m.eval()
    a, _ = m(x)
    b, _ = m(x)
    assert torch.equal(a, b)
    m.train()
    torch.manual_seed(0)
    c, _ = m(x)
    torch.manual_seed(1)
    d, _ = m(x)
    assert not torch.equal(c, d)
    with pytest.warns(UserWarning, match="dropout"):
        our_cls(3, 4, num_layers=1, dropout=0.2, **extra)


@pytest.mark.parametrize("kind", MODULES)
def test_bad_arguments_raise_clear_errors(kind):
    _, our_cls, extra = MODULES[kind]
    with pytest.raises(ValueError, match="hidden_size"):
        our_cls(3, 0, **extra)
    with pytest.raises(ValueError, match="dropout"):
        our_cls(3, 4, dropout=1.5, **extra)
    m = our_cls(3, 4, **extra)
    with pytest.raises(ValueError, match="input_size"):
        m(torch.randn(5, 2, 4))
    with pytest.raises(ValueError, match="2-D .*or 3-D"):
        m(torch.randn(5, 2, 3, 1))
    width = extra.get("proj_size", 4)
    bad_h = torch.zeros(1, 3, width)
    hx = (bad_h, torch.zeros(1, 3, 4)) if kind.startswith("LSTM") else bad_h
    with pytest.raises(ValueError, match=f"h_0.*\\(1, 2, {width}\\).*\\(1, 3, {width}\\)"):
        m(torch.randn(5, 2, 3), hx)


def test_rnn_nonlinearity_checked():
    with pytest.raises(ValueError, match="nonlinearity"):
        rnnattn_ext.RNN(3, 4, nonlinearity="sigmoid")


def test_no_warnings_in_plain_use():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = rnnattn_ext.LSTM(3, 4, num_layers=2)
        out, (h, c) = m(torch.randn(5, 2, 3))
        out.sum().backward()


def test_functional_stack_names_a_missing_weight():
    ours = rnnattn_ext.GRU(5, 8, num_layers=2)
    weights = ours._layer_weights()
    weights[1] = (weights[1][0], None, *weights[1][2:])
    with pytest.raises(TypeError, match=r"stack: weights\[1\] must hold w_ih and w_hh, got None"):
        rnnattn_ext.functional.stack("gru", torch.randn(4, 3, 5), [torch.zeros(2, 3, 8)], weights, 2, False)
