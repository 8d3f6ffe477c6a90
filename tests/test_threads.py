"""Results must not depend on the number of CPU threads (GEMM and pointwise parallelism); a layer runs
on no more threads than the CPUs its process may use (usable_cpus.h)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import rnnattn_ext
from rnnattn_ext import _ops, functional, reference

from helpers import CELLS, GATES, assert_close, grads, layer_args


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


TOLERANCES = {torch.float64: (1e-10, 1e-9), torch.float32: (2e-5, 1e-4)}


def _matches_reference(cell, layer, dtype, gen, reverse=False, lengths=None):
    """functional.layer's output, final states and every gradient against the reference's; returns
    the reference's output."""
    x, states, w_ih, w_hh, b_ih, b_hh = layer
    inputs = [x, *states, w_ih, w_hh, b_ih, b_hh]
    atol, rtol = TOLERANCES[dtype]
    out, finals = functional.layer(cell, x, states, w_ih, w_hh, b_ih, b_hh, reverse=reverse, lengths=lengths)
    ref_out, ref_finals = reference.layer(cell, x, states, w_ih, w_hh, b_ih, b_hh, reverse=reverse, lengths=lengths)
    assert_close(out, ref_out, atol, rtol, "output")
    for f, rf in zip(finals, ref_finals):
        assert_close(f, rf, atol, rtol, "final state")
    weight = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(dtype)
    loss = (out * weight).sum() + sum(f.sum() for f in finals)
    ref_loss = (ref_out * weight).sum() + sum(f.sum() for f in ref_finals)
    for a, b in zip(grads(loss, inputs), grads(ref_loss, inputs)):
        assert_close(a, b, atol * 10, rtol * 10, "gradient")
    return ref_out


# float32 on the CPU runs the packed GEMM kernel, float64 goes through ATen: both are covered.
# Batch 13 exercises full and partial row blocks of the kernel, hidden 100 partial column panels.
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("cell", CELLS)
def test_any_number_of_threads(cell, threads, dtype, restore_threads):
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(20)
    layer = layer_args(cell, 6, 13, 7, 100, dtype, generator=gen)
    for reverse in (False, True):
        _matches_reference(cell, layer, dtype, gen, reverse)


# Batch 40 splits by rows (conftest's bound: every layer small enough): 13 + 13 + 14 rows on 3
# threads, 20 + 20 on 2; hidden 24 has no block of units to split into (fewer than 32), hidden 100
# three: its backward splits by rows (the tie), its forward by units. Lengths make rows finish at
# different steps in every range; sorted longest first (as a PackedSequence's), the rows past the
# last running one are skipped, a range's in part or whole.
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("hidden", [24, 100])
@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("cell", CELLS)
def test_split_by_batch_rows_matches_reference(cell, threads, hidden, dtype, restore_threads):
    torch.set_num_threads(threads)
    forward_split = (1, threads) if hidden < 32 else (threads, 1)
    assert _ops._C.cpu_loop_split(GATES[cell], hidden, 40, 9, False, True) == forward_split
    assert _ops._C.cpu_loop_split(GATES[cell], hidden, 40, 9, True, True) == (1, threads)
    gen = torch.Generator().manual_seed(31)
    layer = layer_args(cell, 9, 40, 7, hidden, dtype, generator=gen)
    lengths = torch.randint(1, 10, (40,), generator=gen)
    lengths[-1] = 9
    longest_first = lengths.sort(descending=True).values
    for reverse, row_lengths in ((False, None), (True, None), (False, lengths), (True, lengths),
                                 (False, longest_first), (True, longest_first)):
        ref_out = _matches_reference(cell, layer, dtype, gen, reverse, row_lengths)
        with torch.no_grad():  # inference: no workspace, the states in alternating buffers
            inference_out, _ = functional.layer(cell, *layer, reverse=reverse, lengths=row_lengths)
        assert_close(inference_out, ref_out, *TOLERANCES[dtype], "inference output")


# From batch 16 up a forward split by units overlaps each thread's next input projection with its
# wait at the step's meeting (recurrent_engine.cpp, kOverlapMinRows): a step at a time instead of a
# chunk at a time, the same sums in the same order as one thread's chunked products (small products:
# one thread runs them in our kernel too, not through ATen), forward and reverse, lengths or none.
@pytest.mark.parametrize("cell", CELLS)
def test_overlapped_input_projection_gives_the_numbers_of_one_thread(cell, restore_threads):
    gen = torch.Generator().manual_seed(22)
    x, states, w_ih, w_hh, b_ih, b_hh = layer_args(cell, 9, 16, 7, 100, torch.float32, generator=gen)
    lengths = torch.randint(1, 10, (16,), generator=gen)
    lengths[3] = 9
    results = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        if threads == 2 and _ops._C.cpu_loop_split(GATES[cell], 100, 16, 9, False, True) != (2, 1):
            pytest.skip("needs 2 usable CPUs for a forward split into 2 blocks of units")
        with torch.no_grad():
            results[threads] = [functional.layer(cell, x, states, w_ih, w_hh, b_ih, b_hh, reverse=reverse,
                                                 lengths=row_lengths)
                                for reverse in (False, True) for row_lengths in (None, lengths)]
    for (one_out, one_finals), (two_out, two_finals) in zip(results[1], results[2]):
        torch.testing.assert_close(two_out, one_out, atol=0, rtol=0)
        for two, one in zip(two_finals, one_finals):
            torch.testing.assert_close(two, one, atol=0, rtol=0)


# The same where a step has more than one meeting (the projection's, the attention stage's): the
# input projection overlaps the last of them.
@pytest.mark.parametrize("kind", ["projection", "self_memory", "external_memory"])
def test_overlapped_input_projection_after_a_steps_later_phases(kind, restore_threads):
    torch.manual_seed(23)
    if kind == "projection":
        module, extra = rnnattn_ext.LSTM(7, 100, proj_size=40), {}
    elif kind == "self_memory":
        module, extra = rnnattn_ext.AttnLSTM(7, 100, num_heads=4, head_dim=8, window=3), {}
    else:
        module = rnnattn_ext.AttnGRU(7, 100, num_heads=4, head_dim=8, memory_size=6)
        extra = {"memory": torch.randn(5, 16, 6), "memory_lengths": torch.randint(1, 6, (16,))}
    x = torch.randn(9, 16, 7)
    lengths = torch.randint(1, 10, (16,))
    lengths[5] = 9
    results = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        with torch.no_grad():
            results[threads] = [module(x, **extra)[0], module(x, lengths=lengths, **extra)[0]]
    if _ops._C.cpu_loop_split(4 if kind != "external_memory" else 3, 100, 16, 9, False, True) != (2, 1):
        pytest.skip("needs 2 usable CPUs for a forward split into 2 blocks of units")
    for two, one in zip(results[2], results[1]):
        torch.testing.assert_close(two, one, atol=0, rtol=0)


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


def test_loop_split_follows_each_steps_work_and_the_layers_shape():
    # The rule (unit_blocks.cpp) with its default bound and 4 threads and CPUs: a thread per 4,096
    # multiply-adds of a step's recurrent product (weights x batch rows) in the forward, per 16,384 in
    # the backward, per 65,536 in a one-step call; blocks of at least 32 units, or ranges of at least 8
    # batch rows where rows are independent (no projection) and give more threads, or (the backward)
    # as many, up to 2 MiB of float weights (a 362-unit LSTM's; a 256-unit attention LSTM's too).
    script = """
        import torch
        from rnnattn_ext import _ops
        torch.set_num_threads(4)
        cases = [
            (4, 64, 1, 100, False, True),    # LSTM(64), batch 1: 4 threads' worth, 2 blocks of 32 units
            (4, 64, 1, 100, True, True),     # its backward: one thread's worth
            (1, 64, 1, 100, False, True),    # RNN(64), batch 1 (4,096): one
            (1, 64, 2, 100, False, True),    # batch 2: two
            (1, 64, 8, 100, True, True),     # backward at batch 8 (32,768): two, by units
            (4, 32, 64, 50, False, True),    # LSTM(32), batch 64: one block of units, 4 ranges of rows
            (4, 32, 64, 50, False, False),   # the same with a projection: one thread
            (4, 32, 20, 50, False, True),    # batch 20: 2 ranges of at least 8 rows
            (4, 128, 32, 50, False, True),   # LSTM(128), batch 32: 4 either way, the forward by units
            (4, 128, 32, 50, True, True),    # the backward by rows
            (4, 512, 64, 50, False, True),   # LSTM(512), batch 64: 4 either way, units (more weights)
            (4, 128, 16, 50, False, True),   # batch 16: 4 blocks of units against 2 ranges of rows
            (4, 128, 1, 1, False, True),     # one step of LSTM(128) at batch 1 (65,536): one
            (4, 128, 2, 1, False, True),     # at batch 2: two
            (4, 256, 32, 50, True, True, 192),  # attention LSTM(256) (4 heads of 16), batch 32: backward by rows
            (4, 384, 32, 50, True, True),    # LSTM(384) (589,824 weights), batch 32: backward by units
        ]
        print(" ".join("%d,%d" % _ops._C.cpu_loop_split(*case) for case in cases))
    """
    def splits(**bound):
        env = {k: v for k, v in os.environ.items() if k != "RNNATTN_CPU_MIN_BLOCK_WORK"}
        env.update(RNNATTN_CPU_MAX_THREADS="4", **bound)
        result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                                timeout=300, env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout.split()

    assert splits() == ["2,1", "1,1", "1,1", "2,1", "2,1", "1,4", "1,1", "1,2", "4,1", "1,4", "4,1", "4,1", "1,1",
                        "2,1", "1,4", "4,1"]
    # The variable moves every bound with it (the forward's a quarter, a one-step call's 4 times).
    assert splits(RNNATTN_CPU_MIN_BLOCK_WORK="65536") == ["1,1", "1,1", "1,1", "1,1", "1,1", "1,4", "1,1", "1,2",
                                                         "4,1", "1,4", "4,1", "4,1", "1,1", "1,1", "1,4", "4,1"]
