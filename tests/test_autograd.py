"""The ops' autograd (csrc/ops/autograd_ops.cpp): which outputs carry gradients, which inputs get them,
saved-tensor safety, double backward refused, compiled autograd, and training in a process that only
loads the compiled library."""

import subprocess
import sys
import textwrap

import pytest
import torch

import rnnattn_ext
from rnnattn_ext import _ops, functional

from conftest import device_params
from helpers import CELLS, attention_args, layer_args


def _base_call(cell, device="cpu", requires_grad=True):
    x, states, w_ih, w_hh, b_ih, b_hh = layer_args(cell, 5, 3, 4, 6, device=device, requires_grad=requires_grad)
    return (x, states, w_ih, w_hh, b_ih, b_hh), lambda: functional.layer(cell, x, states, w_ih, w_hh, b_ih, b_hh)


def _attention_call(cell, memory_slots=None, device="cpu"):
    x, states, weights, memory = attention_args(cell, 5, 3, 4, 6, num_heads=2, head_dim=3, memory_slots=memory_slots,
                                                device=device)
    return (x, *states, *weights, memory), lambda: functional.attention_layer(
        cell, x, states, weights, num_heads=2, window=None if memory is not None else 3, memory=memory,
        need_weights=True)


def _leaves(tensors):
    return [t for t in tensors if t is not None and t.requires_grad]


@pytest.mark.parametrize("cell", CELLS)
def test_only_outputs_with_a_gradient_require_it(cell):
    (x, states, *weights), _ = _base_call(cell)
    result = _ops.forward_op(cell)(x, *states, *weights, *((None,) if cell in _ops.PROJECTED_CELLS else ()), None,
                                   False, True)
    assert all(t.requires_grad for t in result[:-1])
    assert result[-1].dim() == 4 and not result[-1].requires_grad  # the training workspace
    _, call = _attention_call(cell)
    output, finals, context, attention = call()
    assert output.requires_grad and context.requires_grad and all(f.requires_grad for f in finals)
    assert not attention.requires_grad


@pytest.mark.parametrize("cell", CELLS)
def test_gradient_for_a_subset_of_inputs_equals_the_full_one(cell):
    (x, states, w_ih, w_hh, b_ih, b_hh), call = _base_call(cell)
    out, finals = call()
    (full,) = torch.autograd.grad(out.sum() + sum(f.sum() for f in finals), [w_hh])
    for t in (x, *states, w_ih, b_ih, b_hh):
        t.requires_grad_(False)
    out, finals = call()
    (out.sum() + sum(f.sum() for f in finals)).backward()
    assert x.grad is None and w_ih.grad is None
    torch.testing.assert_close(w_hh.grad, full, rtol=0, atol=0)


@pytest.mark.parametrize("memory_slots", [None, 4], ids=["self", "external"])
def test_attention_gradient_reaches_every_input(memory_slots):
    inputs, call = _attention_call("gru", memory_slots)
    output, finals, context, _ = call()
    loss = output.sum() + finals[0].sum() + context.square().sum()
    for i, g in enumerate(torch.autograd.grad(loss, _leaves(inputs))):
        assert g.abs().sum() > 0, f"input {i} (of those given) got a zero gradient"


@pytest.mark.parametrize("attention", [False, True], ids=["base", "attention"])
@pytest.mark.parametrize("cell", CELLS)
def test_double_backward_is_a_clear_error(cell, attention):
    if attention:
        inputs, call = _attention_call(cell)
        output = call()[0]
    else:
        (x, states, *weights), call = _base_call(cell)
        inputs = (x, *states, *weights)
        output = call()[0]
    leaves = _leaves(inputs)
    first = torch.autograd.grad(output.square().sum(), leaves, create_graph=True)
    plain = torch.autograd.grad(call()[0].square().sum(), leaves)
    for a, b in zip(first, plain):  # create_graph leaves the first-order gradient alone
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    backward_name = f"rnnattn::{cell}{'_attn' if attention else ''}_backward"
    with pytest.raises(RuntimeError, match=f"{backward_name} is not differentiable.*create_graph=True"):
        torch.autograd.grad(first[0].square().sum(), leaves)


def test_input_changed_in_place_after_forward_is_refused():
    (x, states, w_ih, w_hh, b_ih, b_hh), call = _base_call("lstm")
    out, _ = call()
    with torch.no_grad():
        w_hh.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_second_backward_needs_retain_graph():
    (x, *_), call = _base_call("gru")
    out, _ = call()
    out.sum().backward(retain_graph=True)
    once = x.grad.clone()
    out.sum().backward()
    torch.testing.assert_close(x.grad, 2 * once, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        out.sum().backward()


def test_no_graph_without_grad_mode_or_without_inputs_needing_it():
    (x, *_), call = _base_call("rnn_tanh", requires_grad=False)
    out, finals = call()
    assert out.grad_fn is None and not finals[0].requires_grad
    (x, *_), call = _base_call("rnn_tanh")
    with torch.no_grad():
        out, finals = call()
    assert out.grad_fn is None and not finals[0].requires_grad


@pytest.mark.parametrize("name", ["LSTM", "AttnGRU"])
def test_compiled_autograd_matches_eager(name):
    torch.manual_seed(0)
    module = rnnattn_ext.LSTM(4, 6, num_layers=2) if name == "LSTM" else rnnattn_ext.AttnGRU(4, 6, num_heads=2,
                                                                                               window=3)
    x = torch.randn(5, 3, 4)
    module(x)[0].sum().backward()
    eager = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    loss_fn = torch.compile(lambda x: module(x)[0].sum(), backend="aot_eager", fullgraph=True)
    with torch._dynamo.compiled_autograd._enable(torch.compile(backend="aot_eager", fullgraph=True)):
        loss_fn(x).backward()
    for a, p in zip(eager, module.parameters()):
        torch.testing.assert_close(p.grad, a, rtol=0, atol=0)


def test_a_process_that_only_loads_the_library_trains(tmp_path):
    """The autograd is in the compiled library: C++ programs (libtorch, TorchScript) can train."""
    (x, states, w_ih, w_hh, b_ih, b_hh), call = _base_call("gru")
    out, finals = call()
    grads = torch.autograd.grad(out.sum() + finals[0].sum(), [x, states[0], w_ih, w_hh, b_ih, b_hh])
    torch.save(([t.detach() for t in (x, states[0], w_ih, w_hh, b_ih, b_hh)], grads), tmp_path / "data.pt")
    code = f"""
        import sys
        import torch
        torch.ops.load_library({rnnattn_ext.library_path()!r})
        assert "rnnattn_ext" not in sys.modules
        inputs, expected = torch.load("data.pt")
        inputs = [t.requires_grad_() for t in inputs]
        x, h0, w_ih, w_hh, b_ih, b_hh = inputs
        out, h_n, workspace = torch.ops.rnnattn.gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh, None, False, True)
        got = torch.autograd.grad(out.sum() + h_n.sum(), inputs)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        print("trained")
    """
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            cwd=tmp_path, timeout=300)
    assert result.returncode == 0 and "trained" in result.stdout, result.stderr[-4000:]


@pytest.mark.parametrize("device", device_params())
def test_gradients_flow_on_each_device(device):
    (x, states, w_ih, w_hh, b_ih, b_hh), call = _base_call("lstm", device=device)
    out, finals = call()
    grads = torch.autograd.grad(out.sum() + finals[1].sum(), [x, w_hh, b_hh])
    assert all(g.device.type == device and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("attention", [False, True], ids=["base", "attention"])
def test_gradients_outlive_the_next_call(cell, attention):
    """The backward accumulates permuted gradients in the calling thread's scratch (several blocks of
    units: conftest lets any layer split); what it returns must be fresh tensors, untouched by the
    next call."""
    def grads_of(seed):
        torch.manual_seed(seed)
        if attention:
            x, states, weights, memory = attention_args(cell, 5, 3, 4, 72, num_heads=2, head_dim=8, memory_slots=None)
            inputs = [x, *states, *weights]
            out = functional.attention_layer(cell, x, states, weights, num_heads=2, window=3)[0]
        else:
            x, states, *weights = layer_args(cell, 5, 3, 4, 72)
            inputs = [x, *states, *weights]
            out = functional.layer(cell, x, states, *weights)[0]
        return torch.autograd.grad((out * out).sum(), inputs)

    first = grads_of(0)
    kept = [g.clone() for g in first]
    grads_of(1)
    for i, (g, k) in enumerate(zip(first, kept)):
        assert torch.equal(g, k), f"gradient {i} changed"
