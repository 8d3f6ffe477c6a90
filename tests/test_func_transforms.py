"""torch.func over the ops and modules: grad, vjp, jacrev and vmap(grad) (per-sample gradients) give what
torch.autograd gives, as they do for torch.nn's layers; nested gradients refuse as double backward does.
Forward mode (jvp, jacfwd, torch.autograd.forward_ad) runs the layers as plain torch operations and
gives torch.nn's tangents; the ops themselves refuse a tangent instead of returning a zero one."""

import pytest
import torch
import torch.autograd.forward_ad as forward_ad

import rnnattn_ext
from rnnattn_ext import _ops, functional

from conftest import device_params
from helpers import CELLS, attention_args, layer_args

# name -> (factory, whether the forward takes an external memory)
MODULES = {
    "LSTM": (lambda: rnnattn_ext.LSTM(3, 4, num_layers=2, bidirectional=True), False),
    "LSTM_proj": (lambda: rnnattn_ext.LSTM(3, 4, proj_size=2), False),
    "GRU": (lambda: rnnattn_ext.GRU(3, 4, num_layers=2), False),
    "RNN_relu": (lambda: rnnattn_ext.RNN(3, 4, nonlinearity="relu", bidirectional=True), False),
    "AttnLSTM_window": (lambda: rnnattn_ext.AttnLSTM(3, 4, num_heads=2, head_dim=2, window=2, num_layers=2), False),
    "AttnGRU_external": (lambda: rnnattn_ext.AttnGRU(3, 4, num_heads=1, memory_size=5), True),
}

MEMORY_SLOTS = 6


def _module(name, device):
    make, external = MODULES[name]
    torch.manual_seed(0)
    return make().to(device=device, dtype=torch.float64), external


def _inputs(external, batch, device, steps=5):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(steps, batch, 3, dtype=torch.float64, generator=g).to(device)
    memory = torch.randn(MEMORY_SLOTS, batch, 5, dtype=torch.float64, generator=g).to(device) if external else None
    return x, memory


def _call(module, x, memory):
    return module(x) if memory is None else module(x, memory=memory)


def _loss(module, x, memory):
    output, _ = _call(module, x, memory)
    return output.pow(2).sum()


def _functional_loss(module, params, x, memory):
    """_loss with `params` in place of the module's parameters (torch.func.functional_call)."""
    output, _ = torch.func.functional_call(module, params, (x,), {} if memory is None else {"memory": memory})
    return output.pow(2).sum()


def _detached_parameters(module):
    return {k: v.detach() for k, v in module.named_parameters()}


def _autograd_gradients(module, x, memory):
    """Parameter and input gradients by torch.autograd, the reference for the transforms."""
    params = dict(module.named_parameters())
    x = x.detach().requires_grad_()
    grads = torch.autograd.grad(_loss(module, x, memory), [x, *params.values()])
    return grads[0], dict(zip(params, grads[1:]))


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("name", sorted(MODULES))
def test_grad_of_functional_call_equals_autograd(name, device):
    module, external = _module(name, device)
    x, memory = _inputs(external, 2, device)

    def loss(params, x):
        return _functional_loss(module, params, x, memory)

    param_grads, input_grad = torch.func.grad(loss, argnums=(0, 1))(_detached_parameters(module), x)
    expected_input, expected_params = _autograd_gradients(module, x, memory)
    torch.testing.assert_close(input_grad, expected_input, rtol=0, atol=0)
    assert param_grads.keys() == expected_params.keys()
    for k in param_grads:
        torch.testing.assert_close(param_grads[k], expected_params[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("name", sorted(MODULES))
def test_per_sample_gradients_by_vmap_of_grad(name, device):
    """The per-sample-gradient recipe: vmap over the batch of grad over the parameters."""
    module, external = _module(name, device)
    x, memory = _inputs(external, 3, device)
    params = _detached_parameters(module)

    def sample_loss(params, x, memory):  # x (T, I), memory (S, M): one sample, unbatched
        return _functional_loss(module, params, x.unsqueeze(1), None if memory is None else memory.unsqueeze(1))

    per_sample = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 1, None if memory is None else 1))(
        params, x, memory)
    for b in range(3):
        _, expected = _autograd_gradients(module, x[:, b : b + 1], None if memory is None else memory[:, b : b + 1])
        for k in params:
            torch.testing.assert_close(per_sample[k][b], expected[k], rtol=1e-12, atol=1e-12, msg=f"{k}[{b}]")


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_jacrev_equals_torch_nn(kind, device):
    torch.manual_seed(0)
    ours = getattr(rnnattn_ext, kind)(3, 4, num_layers=2).to(device=device, dtype=torch.float64)
    peer = getattr(torch.nn, kind)(3, 4, num_layers=2).to(device=device, dtype=torch.float64)
    peer.load_state_dict(ours.state_dict())
    x, _ = _inputs(False, 2, device, steps=4)
    jacobian = torch.func.jacrev(lambda x: ours(x)[0])(x)
    expected = torch.func.jacrev(lambda x: peer(x)[0])(x)
    assert jacobian.shape == (4, 2, 4, 4, 2, 3)
    torch.testing.assert_close(jacobian, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cell", CELLS)
def test_vjp_of_the_functional_layer_with_lengths(cell):
    """torch.func.vjp straight on functional.layer (the ops), with lengths, against torch.autograd."""
    x, states, w_ih, w_hh, b_ih, b_hh = layer_args(cell, 5, 3, 4, 6, requires_grad=False)
    lengths = torch.tensor([5, 2, 4])

    def layer(x, w_hh):
        output, finals = functional.layer(cell, x, states, w_ih, w_hh, b_ih, b_hh, lengths=lengths)
        return output, finals[0]

    (output, final), pullback = torch.func.vjp(layer, x, w_hh)
    cotangents = (torch.randn_like(output), torch.randn_like(final))
    x_grad, w_hh_grad = pullback(cotangents)
    x_, w_hh_ = x.clone().requires_grad_(), w_hh.clone().requires_grad_()
    output_, final_ = layer(x_, w_hh_)
    expected = torch.autograd.grad((output_, final_), (x_, w_hh_), cotangents)
    torch.testing.assert_close(output, output_.detach(), rtol=0, atol=0)
    torch.testing.assert_close(x_grad, expected[0], rtol=0, atol=0)
    torch.testing.assert_close(w_hh_grad, expected[1], rtol=0, atol=0)


def test_grad_over_the_input_of_a_module_whose_parameters_require_grad():
    """The parameters, plain tensors requiring grad outside the transform, get no .grad from it."""
    module, _ = _module("AttnLSTM_window", "cpu")
    x, _ = _inputs(False, 2, "cpu")
    input_grad = torch.func.grad(lambda x: module(x)[0].pow(2).sum())(x)
    assert all(p.grad is None for p in module.parameters())
    expected_input, _ = _autograd_gradients(module, x, None)
    torch.testing.assert_close(input_grad, expected_input, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["LSTM", "AttnLSTM_window"])
def test_nested_grad_is_the_double_backward_error(name):
    module, _ = _module(name, "cpu")
    x, _ = _inputs(False, 2, "cpu")
    inner = torch.func.grad(lambda x: module(x)[0].sum())
    with pytest.raises(RuntimeError, match="_backward is not differentiable: rnnattn_ext's ops have first-order"):
        torch.func.grad(lambda x: inner(x).sum())(x)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_jvp_equals_torch_nn(kind):
    """Forward mode: the layers run as plain torch operations (rnnattn_ext.unrolled) when a tangent
    comes in, lengths and both directions included."""
    torch.manual_seed(0)
    ours = getattr(rnnattn_ext, kind)(3, 4, num_layers=2, bidirectional=True).double()
    peer = getattr(torch.nn, kind)(3, 4, num_layers=2, bidirectional=True).double()
    peer.load_state_dict(ours.state_dict())
    x, _ = _inputs(False, 2, "cpu")
    tangent = torch.randn_like(x)
    output, output_tangent = torch.func.jvp(lambda x: ours(x)[0], (x,), (tangent,))
    expected, expected_tangent = torch.func.jvp(lambda x: peer(x)[0], (x,), (tangent,))
    torch.testing.assert_close(output, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(output_tangent, expected_tangent, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_jacfwd_equals_jacrev(name):
    """Forward mode (plain torch operations) against reverse mode (the ops' backward), for every
    module configuration, attention included."""
    module, external = _module(name, "cpu")
    x, memory = _inputs(external, 2, "cpu", steps=4)
    lengths = torch.tensor([4, 2])

    def run(x):
        return _call(module, x, memory)[0] if external else module(x, lengths=lengths)[0]

    torch.testing.assert_close(torch.func.jacfwd(run)(x), torch.func.jacrev(run)(x), rtol=1e-10, atol=1e-12)


def test_forward_ad_dual_tensors_through_a_stream():
    module, _ = _module("AttnLSTM_window", "cpu")
    x, _ = _inputs(False, 2, "cpu")
    tangent = torch.randn_like(x)
    with forward_ad.dual_level():
        whole = forward_ad.unpack_dual(module(forward_ad.make_dual(x, tangent))[0]).tangent
        state, chunks = None, []
        for part, part_tangent in zip(x.split(2), tangent.split(2)):
            output, state = module.stream(forward_ad.make_dual(part, part_tangent), state)
            chunks.append(forward_ad.unpack_dual(output).tangent)
    expected = torch.func.jvp(lambda x: module(x)[0], (x,), (tangent,))[1]
    torch.testing.assert_close(whole, expected, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat(chunks), expected, rtol=1e-10, atol=1e-12)


def test_the_ops_themselves_refuse_a_tangent_naming_the_argument():
    x, states, w_ih, w_hh, b_ih, b_hh = layer_args("gru", 4, 2, 3, 5, requires_grad=False)
    with forward_ad.dual_level(), pytest.raises(NotImplementedError, match="argument 'weight_hh' carries"):
        _ops.forward_op("gru")(x, *states, w_ih, forward_ad.make_dual(w_hh, torch.ones_like(w_hh)), b_ih, b_hh,
                               None, False, False)


def test_functional_layers_under_jvp_check_their_arguments_as_the_ops_do():
    """Forward mode runs plain torch operations, which would fail inside with a shape error of their
    own (or not at all): the op's checks run first and name the argument."""
    x, states, w_ih, w_hh, b_ih, b_hh = layer_args("lstm", 4, 2, 3, 5, requires_grad=False)
    tangent = torch.ones_like(x)
    with pytest.raises(ValueError, match="lstm_forward: weight_ih must have shape"):
        torch.func.jvp(lambda x: functional.layer("lstm", x, states, w_ih[:, :2], w_hh, b_ih, b_hh)[0], (x,),
                       (tangent,))
    with pytest.raises(ValueError, match="lengths"):
        torch.func.jvp(lambda x: functional.layer("lstm", x, states, w_ih, w_hh, lengths=torch.tensor([5, 1]))[0],
                       (x,), (tangent,))
    x, states, weights, memory = attention_args("gru", 4, 2, 3, 5, 2, 2, memory_slots=3, requires_grad=False)
    with pytest.raises(ValueError, match="gru_attn_forward: .*num_heads"):
        torch.func.jvp(lambda x: functional.attention_layer("gru", x, states, weights, 3, memory=memory)[0], (x,),
                       (torch.ones_like(x),))
    # Well-formed, the same call runs (and gives what jacrev gives).
    run = lambda x: functional.attention_layer("gru", x, states, weights, 2, memory=memory)[0]  # noqa: E731
    torch.testing.assert_close(torch.func.jacfwd(run)(x), torch.func.jacrev(run)(x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["LSTM_proj", "AttnGRU_external"])
def test_compiled_grad_equals_eager(name):
    module, external = _module(name, "cpu")
    x, memory = _inputs(external, 2, "cpu")
    params = _detached_parameters(module)

    def loss(params, x):
        return _functional_loss(module, params, x, memory)

    compiled = torch.compile(torch.func.grad(loss), fullgraph=True, backend="aot_eager")(params, x)
    eager = torch.func.grad(loss)(params, x)
    for k in params:
        torch.testing.assert_close(compiled[k], eager[k], rtol=1e-12, atol=1e-12, msg=k)


@pytest.mark.parametrize("name", ["LSTM", "AttnLSTM_window"])
def test_model_ensemble_by_vmap_over_stacked_parameters(name):
    """torch.func's ensembling recipe: vmap of functional_call over stack_module_state."""
    models = [_module(name, "cpu")[0] for _ in range(3)]
    for k, model in enumerate(models):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * k)
    params, buffers = torch.func.stack_module_state(models)
    x, _ = _inputs(False, 2, "cpu")
    base = models[0]
    outputs = torch.func.vmap(lambda p, b: torch.func.functional_call(base, (p, b), (x,))[0])(params, buffers)
    for k, model in enumerate(models):
        torch.testing.assert_close(outputs[k], model(x)[0], rtol=0, atol=0)
