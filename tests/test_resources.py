"""Resources over long use: no growth of process memory over 10,000 forward+backward calls (nor of
CUDA memory on a GPU), inference over T = 100,000 steps in memory linear in T, and streaming in
constant memory. Each measurement runs in a fresh process, so that nothing else in the test session
moves its numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/statm"),
                                reason="process memory is read from /proc/self/statm (Linux only)")

MiB = 1 << 20

PRELUDE = textwrap.dedent("""
    import json, os, resource, sys
    import torch
    import rnnattn_ext
    torch.manual_seed(0)

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def peak():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    LONG_SEQUENCE_MODELS = {
        "LSTM": lambda: rnnattn_ext.LSTM(8, 16),
        "GRU": lambda: rnnattn_ext.GRU(8, 16),
        "AttnLSTM": lambda: rnnattn_ext.AttnLSTM(8, 16, num_heads=2, window=16),
    }
""")


def run(script: str, timeout: int = 600) -> dict:
    result = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(script)], capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_no_memory_growth_over_10000_training_calls():
    numbers = run("""
        models = [rnnattn_ext.LSTM(6, 12, num_layers=2, bidirectional=True), rnnattn_ext.GRU(6, 12),
                  rnnattn_ext.RNN(6, 12, nonlinearity="relu"), rnnattn_ext.LSTM(6, 12, proj_size=5),
                  rnnattn_ext.AttnLSTM(6, 12, num_heads=2, window=3),
                  rnnattn_ext.AttnGRU(6, 12, num_heads=2, memory_size=4)]
        x = torch.randn(7, 3, 6, requires_grad=True)
        memory = torch.randn(5, 3, 4, requires_grad=True)
        lengths = torch.tensor([7, 2, 5])

        def call(i):
            model = models[i % len(models)]
            extra = {"memory": memory} if model is models[-1] else {}
            y = model(x, lengths=lengths if i % 2 else None, **extra)[0]
            y.sum().backward()

        for i in range(1000):
            call(i)
        start = rss()
        for i in range(1000, 10000):
            call(i)
        print(json.dumps({"start": start, "end": rss()}))
    """)
    growth = numbers["end"] - numbers["start"]
    assert growth < 8 * MiB, f"resident memory grew by {growth / MiB:.1f} MiB over 9,000 calls"


@pytest.mark.cuda
def test_no_cuda_memory_growth_over_10000_training_calls():
    numbers = run("""
        model = rnnattn_ext.AttnLSTM(6, 12, num_heads=2, window=3).cuda()
        plain = rnnattn_ext.GRU(6, 12, num_layers=2).cuda()
        x = torch.randn(7, 3, 6, device="cuda", requires_grad=True)
        lengths = torch.tensor([7, 2, 5], device="cuda")
        for i in range(10000):
            if i == 1000:
                torch.cuda.synchronize()
                start = torch.cuda.memory_allocated()
            m = model if i % 2 else plain
            m(x, lengths=lengths if i % 3 else None)[0].sum().backward()
        torch.cuda.synchronize()
        print(json.dumps({"start": start, "end": torch.cuda.memory_allocated()}))
    """)
    assert numbers["end"] - numbers["start"] <= 0


@pytest.mark.parametrize("module", ["LSTM", "AttnLSTM"])
def test_100000_steps_of_inference_in_memory_linear_in_t(module):
    # Inference keeps the output (and the attention cell's keys and values: one slot per step), not
    # per-step activations: the peak grows with T at a few output-sized buffers.
    numbers = run(f"""
        model = LONG_SEQUENCE_MODELS["{module}"]()
        with torch.no_grad():
            model(torch.randn(100, 1, 8))
            before = peak()
            output = model(torch.randn(100_000, 1, 8))[0]
        assert torch.isfinite(output).all()
        print(json.dumps({{"before": before, "after": peak(), "output_bytes": output.numel() * 4}}))
    """)
    extra = numbers["after"] - numbers["before"]
    # input 100k x 8 floats (3.2 MB) + output 100k x 16 (6.4 MB); the attention cell adds keys, values
    # and contexts (D = 16 wide each: 3 x 6.4 MB).
    budget = 8 * numbers["output_bytes"] + 16 * MiB
    assert extra < budget, f"peak grew by {extra / MiB:.1f} MiB for T = 100,000 (budget {budget / MiB:.1f} MiB)"


@pytest.mark.parametrize("module", ["GRU", "AttnLSTM"])
def test_streaming_100000_steps_in_constant_memory(module):
    numbers = run(f"""
        model = LONG_SEQUENCE_MODELS["{module}"]()
        chunk = torch.randn(1000, 1, 8)
        state = None
        with torch.no_grad():
            for i in range(100):
                if i == 10:
                    start = rss()
                _, state = model.stream(chunk, state)
        print(json.dumps({{"start": start, "end": rss()}}))
    """)
    growth = numbers["end"] - numbers["start"]
    assert growth < 4 * MiB, f"streaming 90,000 steps grew resident memory by {growth / MiB:.1f} MiB"
