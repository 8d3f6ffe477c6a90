"""Reruns are bitwise identical: the same inputs give the same outputs and the same gradients of
every parameter and input, for every module (SPEC: no atomics in reductions)."""

import pytest
import torch

import rnnattn_ext

from conftest import device_params

MODULES = {
    "LSTM": lambda: rnnattn_ext.LSTM(5, 70, num_layers=2, bidirectional=True),
    "LSTM_proj": lambda: rnnattn_ext.LSTM(5, 66, proj_size=7),
    "GRU": lambda: rnnattn_ext.GRU(5, 64, num_layers=2),
    "RNN": lambda: rnnattn_ext.RNN(5, 100, nonlinearity="relu", bidirectional=True),
    "AttnLSTM": lambda: rnnattn_ext.AttnLSTM(5, 64, num_heads=4, window=3, bidirectional=True),
    "AttnGRU_external": lambda: rnnattn_ext.AttnGRU(5, 16, num_heads=2, memory_size=4),
    "AttnRNN": lambda: rnnattn_ext.AttnRNN(5, 16, num_layers=2, num_heads=2),
    "HybridBlock": lambda: rnnattn_ext.HybridBlock(5, 16, num_heads=2, window=3, cell="lstm"),
}


def _once(name, module, device):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(9, 6, 5, generator=gen).to(device).requires_grad_(True)
    kwargs = {"lengths": torch.tensor([9, 3, 1, 9, 5, 2], device=device)}
    if name == "AttnGRU_external":
        kwargs = {"memory": torch.randn(4, 6, 4, generator=gen).to(device).requires_grad_(True),
                  "memory_lengths": torch.tensor([4, 1, 2, 3, 4, 4], device=device)}
    module.zero_grad(set_to_none=True)
    output = module(x, **kwargs)[0]
    probe = torch.randn(output.shape, generator=gen).to(device)
    (output * probe).sum().backward()
    tensors = [output, x.grad] + [p.grad for p in module.parameters()]
    if "memory" in kwargs:
        tensors.append(kwargs["memory"].grad)
    return [t.detach().clone() for t in tensors]


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("name", list(MODULES))
def test_reruns_are_bitwise_identical(name, device):
    torch.manual_seed(0)
    module = MODULES[name]().to(device)
    first, second = _once(name, module, device), _once(name, module, device)
    assert len(first) == len(second) > 2
    for i, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), f"tensor {i} differs between two identical runs"
