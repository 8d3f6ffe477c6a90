"""torch.autocast: the modules work inside mixed-precision code as torch.nn's do.

Autocast runs the base layers' ops in the region's dtype (float16 or bfloat16), as torch.nn runs its
RNNs (cuDNN; oneDNN on the CPU); on the CPU the attention ops run in float32 (their reduced-precision
arguments are cast up: they take float32/float64 there); float64 is never cast. Gradients reach
every parameter in the parameter's own dtype."""

import copy

import pytest
import torch

import rnnattn_ext

MODULES = {
    "LSTM": lambda: rnnattn_ext.LSTM(6, 8, num_layers=2, bidirectional=True),
    "LSTM_proj": lambda: rnnattn_ext.LSTM(6, 8, proj_size=3),
    "GRU": lambda: rnnattn_ext.GRU(6, 8, num_layers=2),
    "RNN_relu": lambda: rnnattn_ext.RNN(6, 8, nonlinearity="relu"),
    "AttnLSTM": lambda: rnnattn_ext.AttnLSTM(6, 8, num_heads=2, head_dim=4, window=3),
    "AttnGRU_external": lambda: rnnattn_ext.AttnGRU(6, 8, num_heads=2, head_dim=4, memory_size=5),
    "AttnRNN": lambda: rnnattn_ext.AttnRNN(6, 8, num_heads=1, head_dim=4),
}
AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]


def _inputs(name, dtype, device="cpu", steps=7, batch=3):
    """(input, kwargs), the floating tensors in `dtype` (as a reduced-precision layer before would give)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(steps, batch, 6, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    kwargs = {}
    if name == "AttnGRU_external":
        kwargs = {"memory": torch.randn(4, batch, 5, generator=gen).to(device=device, dtype=dtype),
                  "memory_lengths": torch.tensor([4, 2, 3], device=device)}
    return x, kwargs


def _outputs(result):
    output, state = result
    return [output, *(state if isinstance(state, tuple) else (state,))]


BASE_MODULES = [name for name in MODULES if not name.startswith("Attn")]
ATTENTION_MODULES = [name for name in MODULES if name.startswith("Attn")]


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=["bf16", "f16"])
@pytest.mark.parametrize("name", BASE_MODULES)
def test_cpu_autocast_runs_base_layers_in_the_regions_dtype(name, dtype):
    torch.manual_seed(0)
    module = MODULES[name]()
    x, _ = _inputs(name, torch.float32)
    with torch.autocast("cpu", dtype=dtype):
        got = _outputs(module(x))
    got_grads = torch.autograd.grad(sum(t.float().square().sum() for t in got), [x, *module.parameters()])
    # The same computation spelled out: the module and its input in that dtype, no autocast.
    low = copy.deepcopy(module).to(dtype)
    x_low = x.detach().to(dtype).requires_grad_()
    expected = _outputs(low(x_low))
    expected_grads = torch.autograd.grad(sum(t.float().square().sum() for t in expected), [x_low, *low.parameters()])
    for a, b in zip(got, expected):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert got_grads[0].dtype == torch.float32  # the input's
    torch.testing.assert_close(got_grads[0], expected_grads[0].float(), atol=0, rtol=0)
    for a, b in zip(got_grads[1:], expected_grads[1:]):
        assert a.dtype == torch.float32  # the parameters' own
        torch.testing.assert_close(a, b.float(), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=["bf16", "f16"])
@pytest.mark.parametrize("name", ATTENTION_MODULES)
def test_cpu_autocast_runs_attention_layers_in_float32_on_the_upcast_input(name, dtype):
    torch.manual_seed(0)
    module = MODULES[name]()
    x, kwargs = _inputs(name, dtype)
    with torch.autocast("cpu", dtype=dtype):
        got = _outputs(module(x, **kwargs))
    got_grads = torch.autograd.grad(sum(t.square().sum() for t in got), [x, *module.parameters()])
    # The same computation spelled out: the reduced-precision arguments cast up, no autocast.
    x32 = x.detach().float().requires_grad_()
    expected = _outputs(module(x32, **{k: v.float() if v.is_floating_point() else v for k, v in kwargs.items()}))
    expected_grads = torch.autograd.grad(sum(t.square().sum() for t in expected), [x32, *module.parameters()])
    for a, b in zip(got, expected):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    # The input's gradient comes in the input's dtype; a layer that reads the input twice (two
    # directions) casts it twice, and the two gradients are summed in that dtype: equal to rounding.
    assert got_grads[0].dtype == dtype
    scale = expected_grads[0].abs().max().item()
    torch.testing.assert_close(got_grads[0].float(), expected_grads[0], atol=2 * torch.finfo(dtype).eps * scale, rtol=0)
    for a, b in zip(got_grads[1:], expected_grads[1:]):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["LSTM", "AttnGRU_external"])
def test_autocast_leaves_float64_alone(name):
    torch.manual_seed(0)
    module = MODULES[name]().double()
    x, kwargs = _inputs(name, torch.float64)
    expected = _outputs(module(x, **kwargs))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _outputs(module(x, **kwargs))
    for a, b in zip(got, expected):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_hybrid_block_under_cpu_autocast():
    # Its attention half is torch's own (autocast runs it in bfloat16): the block runs and stays close.
    torch.manual_seed(0)
    block = rnnattn_ext.HybridBlock(6, 8, num_heads=2, window=3, cell="gru")
    x = torch.randn(7, 3, 6)
    expected, _ = block(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = block(x.bfloat16())
    got.float().sum().backward()
    torch.testing.assert_close(got.float(), expected, atol=5e-2, rtol=5e-2)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in block.parameters())


def test_compiled_module_under_cpu_autocast_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    module = MODULES["AttnLSTM"]()
    compiled = torch.compile(module, fullgraph=True)
    x, _ = _inputs("AttnLSTM", torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, expected = _outputs(compiled(x)), _outputs(module(x))
    for a, b in zip(got, expected):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def _max_error(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=["bf16", "f16"])
@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN"])
def test_cuda_autocast_matches_torch_nn_under_autocast(name, dtype):
    # torch.nn runs cuDNN in the autocast dtype: ours must too, with an error against float64 no
    # worse than twice torch.nn's (SPEC's rule for 16-bit dtypes), and float32 parameter gradients.
    torch.manual_seed(0)
    ours = getattr(rnnattn_ext, name)(32, 48, num_layers=2).cuda()
    peer = getattr(torch.nn, name)(32, 48, num_layers=2).cuda()
    peer.load_state_dict(ours.state_dict())
    exact_module = getattr(rnnattn_ext, name)(32, 48, num_layers=2).cuda().double()
    exact_module.load_state_dict(ours.state_dict())
    x = torch.randn(20, 4, 32, device="cuda")
    exact, _ = exact_module(x.double())
    results = {}
    for label, module in (("ours", ours), ("torch.nn", peer)):
        with torch.autocast("cuda", dtype=dtype):
            out, _ = module(x)
        assert out.dtype == dtype
        out.double().square().sum().backward()
        results[label] = out
        assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in module.parameters())
    assert _max_error(results["ours"], exact) <= 2 * _max_error(results["torch.nn"], exact) + 1e-6
    for (n, a), b in zip(ours.named_parameters(), peer.parameters()):
        scale = b.grad.abs().max().item() + 1e-3
        assert _max_error(a.grad, b.grad) <= 0.05 * scale, n


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=["bf16", "f16"])
@pytest.mark.parametrize("name", ["AttnLSTM", "AttnGRU_external"])
def test_cuda_autocast_attention_cells(name, dtype):
    torch.manual_seed(0)
    module = MODULES[name]().cuda()
    x, kwargs = _inputs(name, torch.float32, "cuda")
    expected = _outputs(module(x, **kwargs))
    with torch.autocast("cuda", dtype=dtype):
        got = _outputs(module(x, **kwargs))
    sum(t.float().square().sum() for t in got).backward()
    for a, b in zip(got, expected):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b, atol=3e-2, rtol=3e-2)
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in module.parameters())
