"""The speed suite's command runs and writes what it promises (tiny shapes: no timing is judged here)."""

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *arguments, timeout=600):
    """benchmarks/<script> with these arguments, in a fresh Python; its completed process."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *arguments],
                          capture_output=True, text=True, timeout=timeout)


def test_suite_quick_writes_json_markdown_and_plot(tmp_path):
    pytest.importorskip("matplotlib", reason="the suite's plot needs matplotlib (scripts/setup.sh installs it)")
    result = _run("suite.py", "--quick", "--devices", "cpu", "--out", str(tmp_path), "--name", "quick")
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "quick.json") as f:
        runs = json.load(f)["runs"]
    assert [(r["device"], r["dtype"]) for r in runs] == [("cpu", "float32")]
    sections = runs[0]["sections"]
    assert {r["cell"] for r in sections["recurrent"]} == {"rnn_tanh", "rnn_relu", "lstm", "gru"}
    assert {r["mode"] for r in sections["recurrent"]} == {"forward", "forward+backward"}
    assert {r["cell"] for r in sections["attention"]} == {"lstm", "gru"}
    assert {r["peer"] for r in sections["step"]} == {"LSTMCell", "GRUCell", "RNNCell"}
    for row in sections["recurrent"] + sections["step"]:
        assert row["ratio"] > 0
    assert all(row["inference_ratio"] > 0 and row["inference_rnnattn_us"] > 0 for row in sections["step"])
    assert all(row["streamer_ratio"] > 0 and row["inference_streamer_us"] > 0 for row in sections["step"])
    machine = runs[0]["machine"]
    assert machine["torch"]
    # One CPU model name may cover CPUs of different caches and vector units: the kernel build says which ran.
    import rnnattn_ext.info
    assert f"CPU kernels {rnnattn_ext.info.cpu_kernels()}" in machine["cpu_detail"]
    table = (tmp_path / "quick.md").read_text()
    assert machine["cpu_detail"] in table.splitlines()[0]
    assert "| lstm | 2×8×16×16 | forward |" in table and "LSTMCell" in table and "`streamer()` µs/step" in table
    assert (tmp_path / "quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_suite_rejects_an_unknown_device(tmp_path):
    result = _run("suite.py", "--quick", "--devices", "tpu", "--out", str(tmp_path), timeout=120)
    assert result.returncode == 2 and "unknown device 'tpu'" in result.stderr


def test_strict_fp32_peer_switches_tf32_off_and_back():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import bench_recurrent

    before = torch.backends.cudnn.allow_tf32
    with bench_recurrent.cudnn_strict_fp32():
        assert torch.backends.cudnn.allow_tf32 is False
    assert torch.backends.cudnn.allow_tf32 == before


def test_recurrent_table_shows_the_strict_fp32_peer_when_measured():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import bench_recurrent

    info = {"date": "d", "cpu": "c", "gpu": "g", "cpu_threads": 1, "torch": "t"}
    row = {"cell": "lstm", "B": 64, "T": 256, "I": 512, "H": 512, "mode": "forward", "torch_nn_ms": 2.0,
           "rnnattn_ms": 4.0, "ratio": 0.5}
    plain = bench_recurrent.markdown_table([row], info, "cuda", "bfloat16")
    assert "strict" not in plain and plain.endswith("| lstm | 64×256×512×512 | forward | 2.00 | 4.00 | 0.50× |")
    strict = dict(row, torch_nn_strict_fp32_ms=6.0, ratio_strict_fp32=1.5)
    table = bench_recurrent.markdown_table([strict], info, "cuda", "float32")
    assert "| lstm | 64×256×512×512 | forward | 2.00 | 4.00 | 0.50× | 6.00 | 1.50× |" in table
    assert "speed-up vs strict fp32" in table and "TF32" in table


def test_attention_step_benchmark_writes_its_rows(tmp_path):
    result = _run("bench_attention_step.py", "--shapes", "1x8x8x4x3", "--steps", "3", "--repeats", "1", "--warmup", "0",
                  "--out", str(tmp_path), "--name", "quick")
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "quick.json") as f:
        rows = json.load(f)["rows"]
    assert [r["cell"] for r in rows] == ["lstm", "gru"]
    for row in rows:
        assert row["attention_us"] > 0 and row["plain_us"] > 0 and row["inference_cost_vs_plain"] > 0
        assert row["attention_streamer_us"] > 0 and row["streamer_cost_vs_plain"] > 0
    assert "| lstm | 1×8×8, 4 (4), 3 |" in (tmp_path / "quick.md").read_text()


def test_step_benchmark_streams_chunks_against_the_layer_modules(tmp_path):
    result = _run("bench_step.py", "--shapes", "1x8x8", "--steps", "6", "--chunk", "3", "--repeats", "1",
                  "--warmup", "0", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "step_cpu_float32_chunk3.json") as f:
        rows = json.load(f)["rows"]
    assert [(r["peer"], r["chunk"]) for r in rows] == [("LSTM", 3), ("GRU", 3), ("RNN", 3)]
    assert all(r["ratio"] > 0 and r["inference_ratio"] > 0 and r["streamer_us"] is None for r in rows)
    assert "| lstm | 1×8×8 | 3 | LSTM |" in (tmp_path / "step_cpu_float32_chunk3.md").read_text()
    rejected = _run("bench_step.py", "--steps", "4", "--chunk", "5", "--out", str(tmp_path), timeout=120)
    assert rejected.returncode == 2 and "--chunk must be in [1, --steps = 4], got 5" in rejected.stderr


def test_decoder_step_benchmark_writes_its_rows(tmp_path):
    result = _run("bench_decoder_step.py", "--shapes", "2x8x8x4x3", "--steps", "3", "--repeats", "1", "--warmup", "0",
                  "--out", str(tmp_path), "--name", "quick")
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "quick.json") as f:
        rows = json.load(f)["rows"]
    assert [r["cell"] for r in rows] == ["lstm", "gru"]
    for row in rows:
        assert row["reference_us"] > 0 and row["stream_us"] > 0
        assert row["new_streamer_speedup"] > 0 and row["reset_streamer_speedup"] > 0
    assert "| gru | 2×8×8, 4 (4), 3 | 3 |" in (tmp_path / "quick.md").read_text()
    rejected = _run("bench_decoder_step.py", "--shapes", "1x8x8x6x3")
    assert rejected.returncode != 0 and "D a multiple of 4" in rejected.stderr


def test_hybrid_step_benchmark_writes_its_rows(tmp_path):
    result = _run("bench_hybrid_step.py", "--shapes", "1x8x8x4x3", "--steps", "3", "--repeats", "1", "--warmup", "0",
                  "--out", str(tmp_path), "--name", "quick")
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "quick.json") as f:
        rows = json.load(f)["rows"]
    assert [r["cell"] for r in rows] == ["lstm", "gru", "rnn_tanh"]
    for row in rows:
        assert row["torch_nn_us"] > 0 and row["stream_speedup"] > 0 and row["streamer_speedup"] > 0
    assert "| rnn_tanh | 1×8×8, 4 (4), 3 |" in (tmp_path / "quick.md").read_text()


def test_cells_benchmark_times_both_modes_against_torch_nn_cells(tmp_path):
    result = _run("bench_cells.py", "--cells", "lstm,rnn_tanh", "--shapes", "2x5x7", "--steps", "3", "--repeats", "1",
                  "--warmup", "0", "--out", str(tmp_path), "--name", "quick")
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "quick.json") as f:
        rows = json.load(f)["rows"]
    assert [(r["cell"], r["mode"]) for r in rows] == [("lstm", "inference"), ("lstm", "training"),
                                                      ("rnn_tanh", "inference"), ("rnn_tanh", "training")]
    assert all(r["torch_nn_us"] > 0 and r["rnnattn_us"] > 0 and r["ratio"] > 0 and r["steps"] == 3 for r in rows)
    assert "| rnn_tanh | 2×5×7 | training | 3 |" in (tmp_path / "quick.md").read_text()
    rejected = _run("bench_cells.py", "--steps", "0", "--out", str(tmp_path), timeout=120)
    assert rejected.returncode == 2 and "--steps must be at least 1, got 0" in rejected.stderr


def test_recurrent_benchmark_runs_stacked_bidirectional_packed_layers(tmp_path):
    result = _run("bench_recurrent.py", "--cells", "gru", "--shapes", "3x4x3x5", "--layers", "2", "--bidirectional",
                  "--packed", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path), "--name", "stacked")
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "stacked.json") as f:
        rows = json.load(f)["rows"]
    assert [r["mode"] for r in rows] == ["forward", "forward+backward"]
    assert all(r["layers"] == 2 and r["bidirectional"] and r["packed"] and r["ratio"] > 0 for r in rows)
    assert "| gru ×2 bi packed | 3×4×3×5 | forward |" in (tmp_path / "stacked.md").read_text()
    refused = _run("bench_recurrent.py", "--layers", "0", "--out", str(tmp_path), timeout=120)
    assert refused.returncode == 2 and "--layers must be >= 1" in refused.stderr


def test_cpu_floor_measures_every_case_and_its_floors():
    import rnnattn_ext.info

    from helpers import cxx_compiler

    if rnnattn_ext.info.cpu_kernels() not in ("avx2", "avx512"):
        pytest.skip(f"cpu_floor times the x86 AVX2 and AVX-512 kernels; they do not run here "
                    f"({rnnattn_ext.info.cpu_kernels()})")
    if cxx_compiler() is None:
        pytest.skip("no C++ compiler (CXX, c++, g++ or clang++) to build cpu_floor with")
    result = _run("cpu_floor.py", "--hidden", "16", "--threads", "1")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    measured = [line for line in lines if line.startswith("| lstm |") or line.startswith("| gru |")
                or line.startswith("| rnn_tanh |")]
    cases = [line.split("|")[2].strip() for line in measured if "×" not in line.split("|")[2]]
    assert cases == ["step B=1", "stream B=1", "step B=16", "GEMM 64"] * 3, result.stdout
    floors = [line for line in measured if "×" in line.split("|")[2]]
    assert len(floors) == 6, result.stdout
    for line in floors:
        forward, both = (float(v) for v in line.strip("| ").split("|")[2:4])
        assert 0 < forward < both, line


def test_cpu_floor_rejects_a_bad_size():
    result = _run("cpu_floor.py", "--hidden", "0", timeout=120)
    assert result.returncode == 2 and "--hidden and --threads must be positive" in result.stderr
