"""CUDA's persistent loops: one kernel runs every step of a layer's forward, one every step of its
backward (csrc/engine/persistent_forward.h, persistent_backward.h, cuda/persistent_cuda.cu).

Their thread blocks' phases run on the host too (tests/cpp/persistent_loop_check.cpp), so every
machine checks how the work is shared out and indexed; the kernels themselves run in the CUDA tests,
forced by RNNATTN_CUDA_LOOP=persistent (which raises where the GPU cannot hold a loop, so a passing
test did run them) against the loop step by step and the CPU."""

import subprocess
from pathlib import Path

import pytest
import torch

from rnnattn_ext import functional

from helpers import CELLS, cxx_compiler, grads, layer_args, loss_of

ROOT = Path(__file__).resolve().parents[1]


def test_block_phases_match_a_plain_loop(tmp_path):
    compiler = cxx_compiler()
    if compiler is None:
        pytest.skip("no C++ compiler (CXX, c++, g++ or clang++) to build the host check with")
    program = tmp_path / "persistent_loop_check"
    build = subprocess.run(
        [compiler, "-std=c++17", "-O1", f"-I{ROOT / 'csrc'}", "-o", str(program),
         str(ROOT / "tests" / "cpp" / "persistent_loop_check.cpp")],
        capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(program)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert " 0 mismatched" in run.stdout, run.stdout


def _layer(cell, args, reverse, lengths):
    x, states, w_ih, w_hh, b_ih, b_hh = args
    return functional.layer(cell, x, states, w_ih, w_hh, b_ih, b_hh, reverse=reverse, lengths=lengths)


def _run_with_gradients(cell, args, reverse, lengths, seed):
    out, finals = _layer(cell, args, reverse, lengths)
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t) for t in (out, *finals)]
    x, states, w_ih, w_hh, b_ih, b_hh = args
    return [out, *finals, *grads(loss_of(out, finals, weights), [x, *states, w_ih, w_hh, b_ih, b_hh])]


def _on(args, device):
    x, states, *weights = args
    move = lambda t: None if t is None else t.detach().to(device).requires_grad_(True)
    return [move(x), [move(s) for s in states], *[move(w) for w in weights]]


# (steps, batch, input, hidden): one unit per block and a batch of 1; a last block with fewer units;
# several units per block (hidden > the SMs); several batch tiles (on an H100, float64 at batch 120
# and hidden 301 stages 76 rows of h at a time forward, 20 rows of gate gradients backward).
SHAPES = [(4, 1, 3, 1), (6, 3, 5, 13), (5, 9, 8, 300), (3, 120, 6, 301)]


@pytest.mark.cuda
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("cell", CELLS)
def test_persistent_loop_matches_the_cpu(cell, shape, monkeypatch):
    monkeypatch.setenv("RNNATTN_CUDA_LOOP", "persistent")
    steps, batch, input_size, hidden = shape
    args = layer_args(cell, steps, batch, input_size, hidden, torch.float64, generator=torch.Generator().manual_seed(3))
    lengths = torch.randint(1, steps + 1, (batch,), generator=torch.Generator().manual_seed(4))
    for reverse, with_lengths in [(False, False), (True, True)]:
        given = lengths if with_lengths else None
        expected = _run_with_gradients(cell, _on(args, "cpu"), reverse, given, 5)
        got = _run_with_gradients(cell, _on(args, "cuda"), reverse, None if given is None else given.cuda(), 5)
        for i, (g, e) in enumerate(zip(got, expected)):
            torch.testing.assert_close(g.cpu(), e, atol=1e-10, rtol=1e-10, msg=lambda m: f"result {i}: {m}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_persistent_loop_matches_the_loop_step_by_step(cell, dtype, monkeypatch):
    # The benchmark's shape (B=64, H=512): the same numbers up to the products' summation order.
    args = _on(layer_args(cell, 16, 64, 512, 512, torch.float32, generator=torch.Generator().manual_seed(6)), "cuda")
    args = [args[0].to(dtype), [s.to(dtype) for s in args[1]], *[w.to(dtype) for w in args[2:]]]
    results = {}
    for loop in ("persistent", "per_step"):
        monkeypatch.setenv("RNNATTN_CUDA_LOOP", loop)
        with torch.no_grad():
            out, finals = _layer(cell, args, False, None)
        results[loop] = [out, *finals]
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    for got, expected in zip(results["persistent"], results["per_step"]):
        torch.testing.assert_close(got, expected, atol=tolerance, rtol=tolerance)


@pytest.mark.cuda
def test_persistent_loop_is_deterministic(monkeypatch):
    monkeypatch.setenv("RNNATTN_CUDA_LOOP", "persistent")
    args = _on(layer_args("lstm", 12, 40, 32, 257, torch.float32, generator=torch.Generator().manual_seed(7)), "cuda")
    first = _run_with_gradients("lstm", args, False, None, 8)
    second = _run_with_gradients("lstm", args, False, None, 8)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.cuda
def test_loop_choice_errors_name_the_variable(monkeypatch):
    args = _on(layer_args("gru", 2, 1, 3, 4, torch.float32), "cuda")
    monkeypatch.setenv("RNNATTN_CUDA_LOOP", "fastest")
    with pytest.raises(RuntimeError, match="RNNATTN_CUDA_LOOP must be auto, persistent or per_step, got 'fastest'"):
        _layer("gru", args, False, None)
    # Each SM's share of W_hh at hidden 4096 (float32) is far more than its shared memory.
    monkeypatch.setenv("RNNATTN_CUDA_LOOP", "persistent")
    big = _on(layer_args("lstm", 1, 1, 3, 4096, torch.float32, requires_grad=False), "cuda")
    with pytest.raises(RuntimeError, match="RNNATTN_CUDA_LOOP=persistent, but this GPU cannot run"):
        _layer("lstm", big, False, None)
    monkeypatch.setenv("RNNATTN_CUDA_LOOP", "auto")
    out, _ = _layer("lstm", big, False, None)  # auto falls back to the loop step by step
    assert torch.isfinite(out).all()
