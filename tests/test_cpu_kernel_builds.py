"""Every build of the CPU kernels this CPU can run: baseline (any x86-64: pointwise passes, packed GEMM,
vector attention), avx2 (AVX2+FMA) and avx512 (the packed GEMM's and the pointwise passes' AVX-512
builds beside the attention passes' AVX2 one), each picked by RNNATTN_CPU_KERNELS in a fresh process
(the choice is made once per process): the layers against torch.nn and the attention cell against
the eager reference, float32 by the SPEC accuracy rule, forward and every gradient; the avx512 build
bitwise against the avx2 one (the same sums in the same order); the variable's errors."""

import functools
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


# Every batch size from 1 to 30 (the GEMM's blocks of 1-12 rows, one and several blocks), hidden sizes
# whose gate rows end in a partial panel, with and without bias, one step (weights read in place) and
# several (packed), forward and every gradient.
BITWISE = """
import sys
import torch
import rnnattn_ext

print("kernels", rnnattn_ext._ops._C.cpu_kernels())
torch.manual_seed(0)
results = []
for batch in range(1, 31):
    for name, hidden, bias, steps in (("LSTM", 20, True, 3), ("GRU", 37, False, 2), ("RNN", 24, True, 1)):
        layer = getattr(rnnattn_ext, name)(11, hidden, bias=bias)
        x = torch.randn(steps, batch, 11, requires_grad=True)
        y, _ = layer(x)
        results += [y.detach(), *torch.autograd.grad((y * y).sum(), [x, *layer.parameters()])]
torch.save(results, sys.argv[1])
print("ok")
"""


def _run(kernels, code=None, args=()):
    env = dict(os.environ, RNNATTN_CPU_KERNELS=kernels)
    code = textwrap.dedent(code or CHECK.format(tests=str(Path(__file__).parent)))
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=600)


@functools.cache
def runnable():
    """The builds this CPU runs (a build it cannot run is refused when chosen)."""
    code = "import rnnattn_ext; rnnattn_ext._ops._C.cpu_kernels()"
    return [kernels for kernels in ("baseline", "avx2", "avx512") if _run(kernels, code).returncode == 0]


def skip_unless_runnable(kernels):
    if kernels not in runnable():
        pytest.skip(f"this CPU cannot run the {kernels} build of the CPU kernels (avx2 needs AVX2 and FMA, "
                    "avx512 AVX-512F)")


@pytest.mark.parametrize("kernels", ["baseline", "avx2", "avx512"])
def test_cpu_kernel_builds_match_the_references(kernels):
    skip_unless_runnable(kernels)
    result = _run(kernels)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.split()
    assert lines[:2] == ["kernels", kernels]
    assert lines[-1] == "ok"


def test_avx512_gemm_is_bitwise_the_avx2_one(tmp_path):
    skip_unless_runnable("avx512")
    results = {}
    for kernels in ("avx2", "avx512"):
        path = tmp_path / f"{kernels}.pt"
        result = _run(kernels, BITWISE, [str(path)])
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.split()[:2] == ["kernels", kernels]
        results[kernels] = torch.load(path)
    assert len(results["avx2"]) == len(results["avx512"]) == 30 * (6 + 4 + 6)  # outputs and gradients
    for i, (a, b) in enumerate(zip(results["avx2"], results["avx512"])):
        assert torch.equal(a, b), f"result {i}: avx512 differs from avx2 by {(a - b).abs().max().item()}"


def test_default_kernels_are_reported():
    capability = torch.backends.cpu.get_cpu_capability()
    kernels = rnnattn_ext._ops._C.cpu_kernels()
    assert kernels in ("baseline", "avx2", "avx512")
    if os.environ.get("RNNATTN_CPU_KERNELS", "auto") in ("", "auto"):
        assert kernels == runnable()[-1]
        if capability == "AVX512":  # torch's AVX512 needs more than F: ours is then there too
            assert kernels == "avx512"
        elif capability == "AVX2":
            assert kernels in ("avx2", "avx512")


@pytest.mark.parametrize("value, message", [
    ("avx3", "RNNATTN_CPU_KERNELS must be auto, baseline, avx2 or avx512, got 'avx3'"),
    ("AVX2", "RNNATTN_CPU_KERNELS must be auto, baseline, avx2 or avx512, got 'AVX2'"),
])
def test_bad_kernel_choice_raises_naming_the_variable(value, message):
    code = """
        import torch, rnnattn_ext
        try:
            rnnattn_ext.LSTM(4, 8)(torch.randn(3, 2, 4))
        except RuntimeError as error:
            print("raised:", error)
        try:
            rnnattn_ext._ops._C.cpu_kernels()
        except RuntimeError as error:
            print("raised:", error)
    """
    result = _run(value, code)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("raised:")]
    assert len(lines) == 2 and all(message in line for line in lines), result.stdout


def test_a_build_the_cpu_cannot_run_is_refused():
    if "avx512" in runnable():
        pytest.skip("this CPU runs every build of the CPU kernels: none to refuse")
    result = _run("avx512", "import rnnattn_ext; print(rnnattn_ext._ops._C.cpu_kernels())")
    assert result.returncode != 0
    assert "RNNATTN_CPU_KERNELS=avx512, but this CPU runs at most the" in result.stderr
