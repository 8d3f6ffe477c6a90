"""The CPU kernels built for any x86-64 (pointwise passes, packed GEMM, vector attention), which a CPU
without AVX2 and FMA runs: RNNATTN_CPU_BASELINE=1 picks them here too. In a fresh process (the choice
is made once per process): the layers against torch.nn and the attention cell against the eager
reference, float32 by the SPEC accuracy rule, forward and every gradient."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import rnnattn_ext

CHECK = """
import sys
import torch
import rnnattn_ext
from rnnattn_ext import _ops, functional, reference
sys.path.insert(0, {tests!r})
from helpers import CELLS, assert_accuracy_rule, attention_args, grads

print("kernels", _ops._C.cpu_kernels())
torch.manual_seed(0)
for name in ("LSTM", "GRU", "RNN"):
    # H = 72: two blocks of units, the packed GEMM's partial panels, the pointwise loops' tails.
    ref = getattr(torch.nn, name)(8, 72, num_layers=2, bidirectional=True)
    ours = getattr(rnnattn_ext, name)(8, 72, num_layers=2, bidirectional=True)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(9, 5, 8)
    results = []
    for module in (ours, ref, ref.double()):
        xg = x.to(next(module.parameters()).dtype).requires_grad_()
        y, _ = module(xg)
        results.append([y, *grads((y * y).sum(), [xg, *module.parameters()])])
        if module is ref:
            results[-1] = [t.detach().clone() for t in results[-1]]
    for i, (a, b, exact) in enumerate(zip(*results)):
        assert_accuracy_rule(a, b, exact, f"{{name}} result {{i}}")
for cell in CELLS:
    for memory_slots in (None, 6):
        gen = torch.Generator().manual_seed(3)
        args = attention_args(cell, 11, 3, 5, 64, 2, 8, memory_slots, dtype=torch.float64, generator=gen)
        x, states, weights, memory = args
        inputs = [t for t in (x, *states, *weights, memory) if t is not None]
        window = None if memory_slots else 4

        def run(impl, dtype):
            xs = [t.detach().to(dtype).requires_grad_() for t in inputs]
            it = iter(xs)
            x_ = next(it)
            states_ = [next(it) for _ in states]
            weights_ = [None if w is None else next(it) for w in weights]
            memory_ = next(it) if memory is not None else None
            if impl == "ours":
                out, finals, ctx, _ = functional.attention_layer(cell, x_, states_, weights_, 2, window, memory_)
            else:
                out, finals, ctx, _ = reference.attention_layer(cell, x_, states_, *weights_, num_heads=2,
                                                                window=window, memory=memory_)
            loss = (out * out).sum() + (ctx * ctx).sum() + sum((f * f).sum() for f in finals)
            return [out.detach(), ctx.detach(), *grads(loss, xs)]

        for i, (a, b, exact) in enumerate(zip(run("ours", torch.float32), run("reference", torch.float32),
                                              run("reference", torch.float64))):
            assert_accuracy_rule(a, b, exact, f"{{cell}} memory={{memory_slots}} result {{i}}")
print("ok")
"""


def _run(baseline):
    env = dict(os.environ, RNNATTN_CPU_BASELINE="1" if baseline else "0")
    code = textwrap.dedent(CHECK.format(tests=str(Path(__file__).parent)))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.skipif(not torch.backends.cpu.get_cpu_capability().startswith("AVX"),
                    reason="not an x86-64 CPU with AVX2: the baseline kernels are the ones every test runs")
@pytest.mark.parametrize("baseline", [True, False], ids=["baseline", "avx2"])
def test_cpu_kernel_builds_match_the_references(baseline):
    result = _run(baseline)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.split()
    assert lines[:2] == ["kernels", "baseline" if baseline else "avx2"]
    assert lines[-1] == "ok"


def test_default_kernels_are_reported():
    expected = "avx2" if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") else None
    kernels = rnnattn_ext._ops._C.cpu_kernels()
    assert kernels in ("avx2", "baseline")
    if expected is not None and os.environ.get("RNNATTN_CPU_BASELINE", "0") in ("", "0"):
        assert kernels == expected
