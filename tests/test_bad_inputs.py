"""The catalogue of bad inputs for every op, generated from the op schemas: each tensor argument of
each op made the wrong rank, the wrong size, the wrong dtype (and, on a GPU, the wrong device) must
raise a Python exception naming that argument, what was expected and what came, from the C++ checks
that run before any indexing. Non-contiguous versions of each argument must work. Empty batches
work; empty sequences are refused, as torch.nn does."""

from __future__ import annotations

import re

import pytest
import torch

import rnnattn_ext
from rnnattn_ext import _ops

from conftest import device_params
from helpers import NUM_STATES, attention_args, layer_args, op_weights, strided

T, B, I, H, P, HEADS, HEAD_DIM, S = 4, 3, 5, 6, 4, 2, 2, 3
STATE_NAMES = ("h0", "c0")


def _forward_args(cell, device, attention=None, projected=False, batch=B):
    """Valid arguments of the forward op, by schema name. attention: None, "self" or "external"."""
    if attention is None:
        x, states, w_ih, w_hh, b_ih, b_hh = layer_args(cell, T, batch, I, H, torch.float32, device,
                                                       requires_grad=False)
        weights = (w_ih, w_hh, b_ih, b_hh)
    else:
        x, states, weights, memory = attention_args(cell, T, batch, I, H, HEADS, HEAD_DIM,
                                                    S if attention == "external" else None, dtype=torch.float32,
                                                    device=device, requires_grad=False)
    args = {"input": x, "lengths": torch.arange(batch, device=device) % T + 1, "reverse": False, "training": True}
    args.update(zip(STATE_NAMES, states))
    args.update(zip(("weight_ih", "weight_hh", "bias_ih", "bias_hh"), weights[:4]))
    if cell in _ops.PROJECTED_CELLS:
        args["weight_hr"] = None
        if projected:
            gen = torch.Generator().manual_seed(3)
            args["weight_hr"] = (torch.rand(P, H, generator=gen) - 0.5).to(device)
            args["weight_hh"] = (torch.rand(4 * H, P, generator=gen) - 0.5).to(device)
            args["h0"] = args["h0"][:, :P].contiguous()
    if attention is not None:
        args.update(zip(("weight_q", "bias_q", "weight_k", "bias_k", "weight_v", "bias_v", "weight_c"), weights[4:]))
        if projected:
            args["weight_q"] = args["weight_q"][:, :P].contiguous()
            if attention == "self":
                args["weight_k"] = args["weight_k"][:, :P].contiguous()
                args["weight_v"] = args["weight_v"][:, :P].contiguous()
        args["memory"] = memory
        args["memory_lengths"] = (torch.arange(batch, device=device) % S + 1) if attention == "external" else None
        args["past_keys"] = args["past_values"] = None
        if attention == "self":  # a streamed call: two slots before the first step
            args["past_keys"] = torch.rand(2, batch, HEADS * HEAD_DIM, device=device)
            args["past_values"] = torch.rand(2, batch, HEADS * HEAD_DIM, device=device)
        args.update(num_heads=HEADS, window=3 if attention == "self" else None, need_weights=True)
    return args


def _op(cell, attention, backward=False):
    name = f"{cell}_attn_{'backward' if backward else 'forward'}" if attention else \
        f"{cell}_{'backward' if backward else 'forward'}"
    return getattr(torch.ops.rnnattn, name).default


def _call(op, args):
    return op(*[args[a.name] for a in op._schema.arguments])


def _backward_args(cell, attention, forward_args):
    """Valid arguments of the backward op: the forward's outputs and random output gradients."""
    forward = _op(cell, attention)
    result = dict(zip([r.name for r in forward._schema.returns], _call(forward, forward_args)))
    gen = torch.Generator().manual_seed(5)
    args = dict(forward_args)
    for name in ("output", "workspace", "context", "attention_workspace"):
        if name in result:
            args[name] = result[name]
    args["grad_output"] = torch.rand(result["output"].shape, generator=gen).to(result["output"])
    args["grad_h_n"] = torch.rand(result["h_n"].shape, generator=gen).to(result["h_n"])
    if "c_n" in result:
        args["grad_c_n"] = torch.rand(result["c_n"].shape, generator=gen).to(result["c_n"])
    if attention:
        args["grad_context"] = torch.rand(result["context"].shape, generator=gen).to(result["context"])
    return args


# (cell, attention, projected) for every op family.
CONFIGS = [(cell, None, False) for cell in _ops.CELLS] + [("lstm", None, True)]
CONFIGS += [(cell, kind, False) for cell in ("lstm", "gru", "rnn_tanh") for kind in ("self", "external")]
CONFIGS += [("lstm", "self", True)]
CONFIG_IDS = [f"{c}-{a or 'plain'}{'-proj' if p else ''}" for c, a, p in CONFIGS]


def _valid(cell, attention, projected, backward, device="cpu", batch=B):
    args = _forward_args(cell, device, attention, projected, batch)
    return _backward_args(cell, attention, args) if backward else args


def _tensor_arguments(op, args):
    return [a.name for a in op._schema.arguments if isinstance(args[a.name], torch.Tensor)]


def _assert_named(op, args, error, name):
    """The call raises `error` whose message names the op, the argument and what came."""
    with pytest.raises(error) as info:
        _call(op, args)
    message = str(info.value)
    assert op._schema.name.split("::")[1] in message and "got" in message, message
    assert re.search(rf"\b{name}\b", message), message


# The dimension whose size a "wrong size" mutation changes: one the op cannot take from the argument
# itself. input defines T, B and I; memory and past slots define S and the number of past slots.
SIZE_DIM = {"memory": 1, "past_keys": 1, "past_values": 1}


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("cell,attention,projected", CONFIGS, ids=CONFIG_IDS)
def test_every_tensor_argument_is_checked(cell, attention, projected, backward):
    op = _op(cell, attention, backward)
    valid = _valid(cell, attention, projected, backward)
    _call(op, valid)  # the valid call works
    checked = 0
    for name in _tensor_arguments(op, valid):
        t = valid[name]
        _assert_named(op, dict(valid, **{name: t.unsqueeze(0)}), ValueError, name)
        if name != "input":
            shape = list(t.shape)
            dim = SIZE_DIM.get(name, 0)
            shape[dim] += 1
            grown = torch.zeros(shape, dtype=t.dtype, device=t.device)
            grown.narrow(dim, 0, t.shape[dim]).copy_(t)
            _assert_named(op, dict(valid, **{name: grown}), ValueError, name)
        other = torch.int32 if t.dtype == torch.int64 else torch.float64
        _assert_named(op, dict(valid, **{name: t.to(other)}), TypeError, name)
        checked += 1
    assert checked >= 6


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("cell,attention,projected", CONFIGS, ids=CONFIG_IDS)
def test_non_contiguous_arguments_work(cell, attention, projected, backward):
    # The same values in another layout give the same results up to rounding: a GEMM library may
    # sum in another order for a transposed operand, as it does for torch.nn.
    op = _op(cell, attention, backward)
    valid = _valid(cell, attention, projected, backward)
    expected = _call(op, valid)
    for name in _tensor_arguments(op, valid):
        strided_arg = strided(valid[name])
        assert not strided_arg.is_contiguous() or strided_arg.numel() <= 1
        for got, want in zip(_call(op, dict(valid, **{name: strided_arg})), expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("cell", _ops.CELLS)
def test_expanded_states_and_broadcast_views_work(cell):
    args = _valid(cell, None, False, False)
    expected = _call(_op(cell, None), dict(args, **{s: args[s][:1].expand(B, H).contiguous()
                                                    for s in STATE_NAMES[:NUM_STATES[cell]]}))
    expanded = dict(args, **{s: args[s][:1].expand(B, H) for s in STATE_NAMES[:NUM_STATES[cell]]})
    for got, want in zip(_call(_op(cell, None), expanded), expected):
        assert torch.equal(got, want)


@pytest.mark.parametrize("attention", [None, "self", "external"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_bad_length_values_are_named(cell, attention):
    op = _op(cell, attention)
    valid = _valid(cell, attention, False, False)
    for bad in (0, -1, T + 1):
        lengths = valid["lengths"].clone()
        lengths[1] = bad
        with pytest.raises(ValueError, match=rf"lengths must lie in \[1, T\] = \[1, {T}\], got values in"):
            _call(op, dict(valid, lengths=lengths))
    if attention == "external":
        for bad in (0, S + 1):
            memory_lengths = valid["memory_lengths"].clone()
            memory_lengths[0] = bad
            with pytest.raises(ValueError, match=rf"memory_lengths must lie in \[1, S\] = \[1, {S}\]"):
                _call(op, dict(valid, memory_lengths=memory_lengths))


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("cell,attention,projected", CONFIGS, ids=CONFIG_IDS)
def test_empty_batch_works(cell, attention, projected, backward):
    valid = _valid(cell, attention, projected, backward, batch=0)
    for t in _call(_op(cell, attention, backward), valid):
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("cell,attention,projected", CONFIGS, ids=CONFIG_IDS)
def test_empty_sequence_is_refused_as_torch_nn_does(cell, attention, projected):
    valid = _valid(cell, attention, projected, False)
    empty = dict(valid, input=valid["input"][:0], lengths=None)
    with pytest.raises(ValueError, match=r"input must have at least one time step \(T >= 1\), got shape \[0, 3, 5\]"):
        _call(_op(cell, attention), empty)


@pytest.mark.cuda
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("cell,attention,projected", CONFIGS, ids=CONFIG_IDS)
def test_an_argument_on_another_device_is_named(cell, attention, projected, backward):
    op = _op(cell, attention, backward)
    valid = _valid(cell, attention, projected, backward, device="cuda")
    for name in _tensor_arguments(op, valid):
        if name == "input":
            continue
        with pytest.raises(ValueError, match=rf"{name} must be on the device of .*got cpu"):
            _call(op, dict(valid, **{name: valid[name].cpu()}))


# Modules: what a user passes wrongly, and what the message says.
MODULE_CASES = [
    ("LSTM", lambda: torch.randn(4, 3, 6), {}, ValueError,
     r"input.size\(-1\) must be equal to input_size. Expected 5, got 6"),
    ("LSTM", lambda: torch.randn(4, 3, 5, 1), {}, ValueError, "expected input to be 2-D .* or 3-D .*, got 4-D"),
    ("LSTM", lambda: torch.randn(0, 3, 5), {}, ValueError, r"at least one time step \(T >= 1"),
    ("LSTM", lambda: torch.randn(4, 3, 5), {"hx": (torch.zeros(1, 2, 8), torch.zeros(1, 3, 8))}, ValueError,
     r"expected h_0 of size \(1, 3, 8\), got \(1, 2, 8\)"),
    ("LSTM", lambda: torch.randn(4, 3, 5), {"hx": torch.zeros(1, 3, 8)}, TypeError, "hx must be a tuple"),
    ("GRU", lambda: torch.randn(4, 3, 5), {"hx": (torch.zeros(1, 3, 8),)}, TypeError, "hx must be a Tensor"),
    ("GRU", lambda: torch.randn(4, 3, 5), {"hx": torch.zeros(3, 8)}, ValueError, "h_0 should also be 3-D but got 2-D"),
    ("GRU", lambda: torch.randn(4, 3, 5), {"lengths": [1, 5, 2]}, ValueError,
     r"lengths must lie in \[1, T\] = \[1, 4\], got values in \[1, 5\]"),
    ("GRU", lambda: torch.randn(4, 3, 5), {"lengths": [1, 2]}, ValueError, r"lengths must have shape \(B,\) = \(3,\)"),
    ("RNN", lambda: torch.randn(4, 3, 5), {"lengths": torch.tensor([1.0, 2.0, 3.0])}, TypeError,
     "lengths must hold integers, got torch.float32"),
    ("RNN", lambda: torch.randn(4, 3, 5).double(), {}, TypeError,
     r"RNN: input must have the parameters' dtype \(torch.float32\), got torch.float64"),
    ("AttnGRU", lambda: torch.randn(4, 3, 5), {"memory": torch.randn(2, 3, 7)}, ValueError, "memory"),
    ("AttnGRU", lambda: torch.randn(4, 3, 5), {}, ValueError, "memory"),
    ("AttnGRU", lambda: torch.randn(4, 3, 5), {"memory": torch.randn(2, 3, 6), "memory_lengths": [1, 3, 1]},
     ValueError, r"memory_lengths must lie in \[1, S\] = \[1, 2\]"),
    ("AttnLSTM_self", lambda: torch.randn(4, 3, 5), {"memory": torch.randn(2, 3, 8)}, ValueError, "memory"),
]
MODULES = {
    "LSTM": lambda: rnnattn_ext.LSTM(5, 8),
    "GRU": lambda: rnnattn_ext.GRU(5, 8),
    "RNN": lambda: rnnattn_ext.RNN(5, 8),
    "AttnGRU": lambda: rnnattn_ext.AttnGRU(5, 8, num_heads=2, memory_size=6),
    "AttnLSTM_self": lambda: rnnattn_ext.AttnLSTM(5, 8, num_heads=2, window=3),
}


@pytest.mark.parametrize("module,make_input,kwargs,error,match", MODULE_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(MODULE_CASES)])
def test_module_bad_inputs(module, make_input, kwargs, error, match):
    with pytest.raises(error, match=match):
        MODULES[module]()(make_input(), **kwargs)


# A parameter that no longer fits (replaced by hand, loaded from elsewhere): the module's error names
# it, not the op's argument it became; through the C++ layer call (one direction) and the general
# path (bidirectional), forward and stream.
PARAMETER_CASES = [
    (lambda: rnnattn_ext.LSTM(5, 8, num_layers=2), "weight_hh_l1", torch.randn(32, 7), ValueError,
     r"LSTM: parameter weight_hh_l1 must have shape \(32, 8\), got \(32, 7\)"),
    (lambda: rnnattn_ext.GRU(5, 8, num_layers=2, bidirectional=True), "bias_ih_l1_reverse", torch.randn(23), ValueError,
     r"GRU: parameter bias_ih_l1_reverse must have shape \(24,\), got \(23,\)"),
    (lambda: rnnattn_ext.RNN(5, 8, num_layers=3), "weight_ih_l2", torch.randn(8, 8, dtype=torch.float64), TypeError,
     r"RNN: parameter weight_ih_l2 must have the input's dtype \(torch.float32\), got torch.float64"),
    (lambda: rnnattn_ext.LSTM(5, 8, proj_size=4, bidirectional=True), "weight_hr_l0_reverse",
     torch.randn(4, 8, dtype=torch.float64), TypeError,
     r"LSTM: parameter weight_hr_l0_reverse must have the input's dtype"),
    (lambda: rnnattn_ext.AttnLSTM(5, 8, num_layers=2, num_heads=2, head_dim=3, window=3), "weight_k_l1",
     torch.randn(6, 7), ValueError, r"AttnLSTM: parameter weight_k_l1 must have shape \(6, 8\), got \(6, 7\)"),
    (lambda: rnnattn_ext.AttnGRU(5, 8, num_heads=2, memory_size=6, bidirectional=True), "weight_c_l0_reverse",
     torch.randn(24, 8, dtype=torch.float64), TypeError,
     r"AttnGRU: parameter weight_c_l0_reverse must have the input's dtype"),
]


# stream is for unidirectional modules only.
PARAMETER_CALLS = [(call, case) for case in PARAMETER_CASES for call in ("forward", "stream")
                   if call == "forward" or "reverse" not in case[1]]


@pytest.mark.parametrize("call,case", PARAMETER_CALLS, ids=[f"{c[1][1]}-{c[0]}" for c in PARAMETER_CALLS])
def test_module_names_the_parameter_that_does_not_fit(call, case):
    make, name, value, error, match = case
    module = make()
    setattr(module, name, torch.nn.Parameter(value))
    kwargs = {"memory": torch.randn(2, 3, 6)} if getattr(module, "memory_size", None) else {}
    run = module if call == "forward" else module.stream
    with pytest.raises(error, match=match) as caught:
        run(torch.randn(4, 3, 5), **kwargs)
    assert "rnnattn." in str(caught.value.__cause__)  # the op's own error stays in the chain


def test_module_error_not_about_a_parameter_stays_as_it_was():
    module = rnnattn_ext.GRU(5, 8, num_layers=2)
    with pytest.raises(ValueError, match=r"expected h_0 of size \(2, 3, 8\), got \(2, 2, 8\)") as caught:
        module(torch.randn(4, 3, 5), torch.zeros(2, 2, 8))
    assert caught.value.__cause__ is None


@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN"])
def test_module_empty_batch_matches_torch_nn(name):
    ref = getattr(torch.nn, name)(5, 8, num_layers=2, bidirectional=True)
    ours = getattr(rnnattn_ext, name)(5, 8, num_layers=2, bidirectional=True)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 0, 5, requires_grad=True)
    expected, got = ref(x), ours(x)
    assert got[0].shape == expected[0].shape
    got[0].sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("device", device_params())
def test_ops_on_unsupported_dtypes_say_which(device):
    args = _valid("gru", None, False, False, device=device)
    bad = {k: (v.to(torch.int32) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
           for k, v in args.items()}
    with pytest.raises(TypeError, match="input must be .*got Int"):
        _call(_op("gru", None), bad)


def test_op_weights_helper_is_consistent():
    # The catalogue builds arguments by schema name; the other tests use op_weights: both must agree.
    args = _valid("lstm", "self", False, False)
    order = [a.name for a in _op("lstm", "self")._schema.arguments]
    weights = tuple(args[n] for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_q", "bias_q",
                                      "weight_k", "bias_k", "weight_v", "bias_v", "weight_c"))
    assert order[3:15] == ["weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr", "weight_q", "bias_q",
                           "weight_k", "bias_k", "weight_v", "bias_v", "weight_c"]
    assert len(op_weights("lstm", weights)) == 12
