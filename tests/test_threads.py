"""Results must not depend on the number of CPU threads (GEMM and pointwise parallelism); a layer runs
on no more threads than the CPUs its process may use (usable_cpus.h)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from rnnattn_ext import functional, reference

from helpers import CELLS, assert_close, grads, layer_args


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


TOLERANCES = {torch.float64: (1e-10, 1e-9), torch.float32: (2e-5, 1e-4)}


# float32 on the CPU runs the packed GEMM kernel, float64 goes through ATen: both are covered.
# Batch 13 exercises full and partial row blocks of the kernel, hidden 100 partial column panels.
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("cell", CELLS)
def test_any_number_of_threads(cell, threads, dtype, restore_threads):
    torch.set_num_threads(threads)
    atol, rtol = TOLERANCES[dtype]
    gen = torch.Generator().manual_seed(20)
    x, states, w_ih, w_hh, b_ih, b_hh = layer_args(cell, 6, 13, 7, 100, dtype, generator=gen)
    inputs = [x, *states, w_ih, w_hh, b_ih, b_hh]
    for reverse in (False, True):
        out, finals = functional.layer(cell, x, states, w_ih, w_hh, b_ih, b_hh, reverse=reverse)
        ref_out, ref_finals = reference.layer(cell, x, states, w_ih, w_hh, b_ih, b_hh, reverse=reverse)
        assert_close(out, ref_out, atol, rtol, "output")
        for f, rf in zip(finals, ref_finals):
            assert_close(f, rf, atol, rtol, "final state")
        weight = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(dtype)
        loss = (out * weight).sum() + sum(f.sum() for f in finals)
        ref_loss = (ref_out * weight).sum() + sum(f.sum() for f in ref_finals)
        for a, b in zip(grads(loss, inputs), grads(ref_loss, inputs)):
            assert_close(a, b, atol * 10, rtol * 10, "gradient")


def test_default_block_sizes_match_reference():
    # The library's default split (small layers on fewer blocks than threads), which the rest of the
    # suite overrides (conftest.py), in a process of its own: every cell, one step and several, sizes
    # on both sides of the bounds, 2 threads.
    script = textwrap.dedent("""
        import torch
        from rnnattn_ext import functional, reference
        torch.set_num_threads(2)
        gen = torch.Generator().manual_seed(3)
        for cell, gates in (("lstm", 4), ("gru", 3), ("rnn_tanh", 1), ("rnn_relu", 1)):
            for hidden in (64, 128, 300):
                for steps in (1, 3, 9):
                    x = torch.rand(steps, 3, 20, generator=gen) - 0.5
                    states = [torch.rand(3, hidden, generator=gen) - 0.5 for _ in range(2 if cell == "lstm" else 1)]
                    k = hidden ** -0.5
                    w = [(torch.rand(gates * hidden, n, generator=gen) - 0.5) * k for n in (20, hidden)]
                    b = [(torch.rand(gates * hidden, generator=gen) - 0.5) * k for _ in range(2)]
                    out, finals = functional.layer(cell, x, states, *w, *b)
                    ref, ref_finals = reference.layer(cell, x.double(), [s.double() for s in states],
                                                      *[t.double() for t in w + b])
                    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
                    for f, rf in zip(finals, ref_finals):
                        torch.testing.assert_close(f.double(), rf, atol=2e-5, rtol=1e-4)
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "RNNATTN_CPU_MIN_BLOCK_WORK"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr


def test_many_shapes_in_turn_on_one_thread(restore_threads):
    # Each thread keeps the block split of its last few shapes (unit_blocks.cpp): more shapes than it
    # keeps, in turn and twice over, with their row orders reused and rebuilt, give the reference's numbers.
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(21)
    cases = [(cell, hidden) for hidden in (40, 72, 104, 136) for cell in CELLS]  # 12 splits (gates, hidden)
    layers = {case: layer_args(case[0], 3, 2, 5, case[1], torch.float32, generator=gen, requires_grad=False)
              for case in cases}
    for _ in range(2):
        for case in cases:
            x, states, *weights = layers[case]
            out, finals = functional.layer(case[0], x, states, *weights)
            ref, ref_finals = reference.layer(case[0], x.double(), [s.double() for s in states],
                                              *[w.double() for w in weights])
            assert_close(out, ref.float(), 2e-5, 1e-4, f"output {case}")
            for f, rf in zip(finals, ref_finals):
                assert_close(f, rf.float(), 2e-5, 1e-4, f"final state {case}")


def _run_script(script, **env):
    environment = {k: v for k, v in os.environ.items() if k != "RNNATTN_CPU_MAX_THREADS"}
    environment.update(env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=300,
                          env=environment)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs os.sched_setaffinity (Linux)")
def test_threads_keep_to_the_cpus_the_process_may_use():
    # With one CPU in its affinity mask and torch asking for 3 threads, a layer runs on one: the
    # barrier between steps spins, and threads beyond the CPUs made small layers many times slower.
    result = _run_script("""
        import os
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        import torch
        import rnnattn_ext
        from rnnattn_ext import _ops, functional, reference
        from rnnattn_ext.info import cpu_threads
        torch.set_num_threads(3)
        assert _ops._C.usable_cpus() == 1, _ops._C.usable_cpus()
        assert cpu_threads().startswith("at most 1 "), cpu_threads()
        gen = torch.Generator().manual_seed(4)
        x, h, c = torch.randn(5, 2, 8, generator=gen), torch.randn(2, 64, generator=gen), torch.randn(2, 64, generator=gen)
        w = [torch.randn(256, n, generator=gen) * 0.1 for n in (8, 64)] + [torch.randn(256, generator=gen) * 0.1] * 2
        out, _ = functional.layer("lstm", x, [h, c], *w)
        ref, _ = reference.layer("lstm", x.double(), [h.double(), c.double()], *[t.double() for t in w])
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
        print("ok")
    """, RNNATTN_CPU_MIN_BLOCK_WORK="1")
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr


def test_max_threads_variable_replaces_the_detected_cpus_and_a_bad_value_raises():
    script = """
        import torch
        from rnnattn_ext import _ops
        print(_ops._C.usable_cpus())
        try:
            torch.ops.rnnattn.rnn_tanh_forward(torch.randn(2, 1, 3), torch.zeros(1, 4), torch.randn(4, 3),
                                               torch.randn(4, 4), None, None, None, False, False)
        except RuntimeError as error:
            print(str(error).splitlines()[0])
    """
    result = _run_script(script, RNNATTN_CPU_MAX_THREADS="5")
    assert result.returncode == 0 and result.stdout.split() == ["5"], result.stdout + result.stderr
    result = _run_script(script.replace("print(_ops._C.usable_cpus())", ""), RNNATTN_CPU_MAX_THREADS="0")
    assert "RNNATTN_CPU_MAX_THREADS must be a positive integer" in result.stdout, result.stdout + result.stderr
    assert "got '0'" in result.stdout


def test_thread_count_follows_each_steps_work_batch_rows_included():
    # The rule (unit_blocks.cpp), with its default bound, 4 threads and CPUs: a thread per 4,096
    # multiply-adds of a step's recurrent product (weights x batch rows) in the forward, per 16,384
    # in the backward, per 65,536 in a one-step call (a layer then takes at most one thread per 32
    # units). A 64-unit LSTM (16,384 weights) at batch 1 gets 4 threads for its forward and 1 for its
    # backward; a 64-unit Elman RNN (4,096) needs batch 2 for a second forward thread; batch 64 fills
    # every thread in either pass.
    script = """
        import torch
        from rnnattn_ext import _ops
        torch.set_num_threads(4)
        rule = _ops._C.cpu_threads_for
        cases = [(16384, 1, 100, False), (16384, 1, 100, True), (4096, 1, 100, False), (4096, 2, 100, False),
                 (4096, 7, 100, True), (4096, 8, 100, True), (65536, 1, 1, False), (65536, 2, 1, False),
                 (4096, 64, 100, False), (4096, 64, 100, True), (2**40, 2**40, 100, False), (0, 0, 100, False)]
        print(" ".join(str(rule(*case)) for case in cases))
    """
    env = {k: v for k, v in os.environ.items() if k != "RNNATTN_CPU_MIN_BLOCK_WORK"}
    env["RNNATTN_CPU_MAX_THREADS"] = "4"
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.split() == ["4", "1", "1", "2", "1", "2", "1", "2", "4", "4", "4", "1"], result.stdout
    # The variable moves every bound with it (the forward's a quarter, a one-step call's 4 times).
    env["RNNATTN_CPU_MIN_BLOCK_WORK"] = "65536"
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.split() == ["1", "1", "1", "1", "1", "1", "1", "1", "4", "4", "4", "1"], result.stdout
