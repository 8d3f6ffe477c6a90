"""Shared builders for the tests: random layer arguments and gradient comparison."""

from __future__ import annotations

import os
import sys

import torch

import rnnattn_ext
from rnnattn_ext import _ops

GATES = {cell: layout[0] for cell, layout in _ops.CELL_LAYOUTS.items()}
NUM_STATES = {cell: layout[1] for cell, layout in _ops.CELL_LAYOUTS.items()}
CELLS = _ops.CELLS


def layer_args(cell, steps, batch, input_size, hidden, dtype=torch.float64, device="cpu", bias=True,
               requires_grad=True, scale=1.0, generator=None):
    """input, states, w_ih, w_hh, b_ih, b_hh for one layer; weights ~ U(-scale/sqrt(H), scale/sqrt(H))."""
    g = GATES[cell]

    def rand(*shape, s=1.0):
        t = (torch.rand(*shape, dtype=torch.float64, generator=generator) * 2 - 1) * s
        return t.to(device=device, dtype=dtype).requires_grad_(requires_grad)

    k = scale / hidden**0.5
    x = rand(steps, batch, input_size)
    states = [rand(batch, hidden) for _ in range(NUM_STATES[cell])]
    w_ih, w_hh = rand(g * hidden, input_size, s=k), rand(g * hidden, hidden, s=k)
    b_ih = rand(g * hidden, s=k) if bias else None
    b_hh = rand(g * hidden, s=k) if bias else None
    return x, states, w_ih, w_hh, b_ih, b_hh


def proj(cell, weight_hr=None):
    """weight_hr as the ops take it (after bias_hh in forward, weight_hh in backward): an argument
    of the projected cells' (LSTM) ops only."""
    return (weight_hr,) if cell in _ops.PROJECTED_CELLS else ()


def op_weights(cell, weights, weight_hr=None):
    """The attention forward op's weight arguments: the 11 weights with weight_hr after bias_hh."""
    return (*weights[:4], *proj(cell, weight_hr), *weights[4:11])


def run_layer(impl, cell, x, states, w_ih, w_hh, b_ih, b_hh, reverse):
    return impl.layer(cell, x, states, w_ih, w_hh, b_ih, b_hh, reverse=reverse)


def gradcheck_layer(cell, x, states, weights, lengths=None):
    """torch.autograd.gradcheck of functional.layer in both directions, over x, the states and the
    weights (w_ih, w_hh, b_ih, b_hh)."""
    n = len(states)
    for reverse in (False, True):

        def fn(x, *rest, reverse=reverse):
            out, finals = rnnattn_ext.functional.layer(cell, x, list(rest[:n]), *rest[n:], reverse=reverse,
                                                       lengths=lengths)
            return (out, *finals)

        assert torch.autograd.gradcheck(fn, (x, *states, *weights))


def loss_of(output, finals, weights):
    """A scalar that depends on every output with distinct random weights per element."""
    total = (output * weights[0]).sum()
    for f, w in zip(finals, weights[1:]):
        total = total + (f * w).sum()
    return total


def grads(loss, tensors):
    tensors = [t for t in tensors if t is not None]
    return torch.autograd.grad(loss, tensors, allow_unused=False)


def assert_close(actual, expected, atol, rtol, what=""):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def rms(t):
    return t.double().pow(2).mean().sqrt().item() if t.numel() else 0.0


def assert_accuracy_rule(ours, eager, exact, what=""):
    """The SPEC accuracy rule for float32 and lower: against the float64 result on the same inputs, our
    error may be at most twice the eager reference's in the same dtype. A tensor's error is its root
    mean square (a maximum over one element is mostly luck, e.g. a relu kink flipped by rounding), and
    the 1e-6 slack scales with the tensor (gradients of biases are sums of thousands of terms)."""
    exact = exact.double()
    ours_error, eager_error = rms(ours.double() - exact), rms(eager.double() - exact)
    slack = 1e-6 * max(1.0, rms(exact))
    assert ours_error <= 2 * eager_error + slack, f"{what}: error {ours_error:.3g} vs eager {eager_error:.3g}"


__all__ = ["rnnattn_ext", "layer_args", "attention_args", "proj", "op_weights", "run_layer", "gradcheck_layer", "loss_of", "grads", "assert_close",
           "assert_accuracy_rule", "rms", "CELLS"]


ATTENTION_NAMES = ("weight_q", "bias_q", "weight_k", "bias_k", "weight_v", "bias_v", "weight_c")


def attention_args(cell, steps, batch, input_size, hidden, num_heads, head_dim, memory_slots=None, memory_width=5,
                   dtype=torch.float64, device="cpu", bias=True, requires_grad=True, generator=None):
    """Layer arguments plus the attention cell's: returns (x, states, weights (11-tuple), memory or
    None).
    weights = (w_ih, w_hh, b_ih, b_hh, w_q, b_q, w_k, b_k, w_v, b_v, w_c)."""
    x, states, w_ih, w_hh, b_ih, b_hh = layer_args(cell, steps, batch, input_size, hidden, dtype, device, bias,
                                                   requires_grad, generator=generator)
    width = num_heads * head_dim
    mem_width = hidden if memory_slots is None else memory_width

    def rand(*shape, s):
        t = (torch.rand(*shape, dtype=torch.float64, generator=generator) * 2 - 1) * s
        return t.to(device=device, dtype=dtype).requires_grad_(requires_grad)

    # Fan-in scaling keeps the recurrence (which now also runs through the context) stable over long
    # sequences; q and k twice that, so that the scores spread over a few units: the softmax is
    # neither flat nor one-hot.
    w_q, w_k = rand(width, hidden, s=2 / hidden**0.5), rand(width, mem_width, s=2 / mem_width**0.5)
    w_v = rand(width, mem_width, s=1 / mem_width**0.5)
    b_q, b_k, b_v = (rand(width, s=0.5) for _ in range(3)) if bias else (None, None, None)
    w_c = rand(GATES[cell] * hidden, width, s=1 / width**0.5)
    memory = None if memory_slots is None else rand(memory_slots, batch, mem_width, s=1.0)
    return x, states, (w_ih, w_hh, b_ih, b_hh, w_q, b_q, w_k, b_k, w_v, b_v, w_c), memory


def strided(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous layout: a transposed copy transposed back for 2-D and
    more, every other element of a twice-as-long buffer for 1-D."""
    if t.dim() >= 2:
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    wide = torch.zeros(2 * t.numel(), dtype=t.dtype, device=t.device)
    wide[::2] = t
    return wide[::2]


def cxx_compiler():
    """The C++ compiler the host checks (tests/cpp) are built with: CXX, else c++, g++ or clang++;
    None if there is none (benchmarks/cpu_floor.py finds it the same way)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    from cpu_floor import cxx_compiler as find

    return find()
