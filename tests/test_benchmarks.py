"""The speed suite's command runs and writes what it promises (tiny shapes: no timing is judged here)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_suite_quick_writes_json_markdown_and_plot(tmp_path):
    pytest.importorskip("matplotlib", reason="the suite's plot needs matplotlib (scripts/setup.sh installs it)")
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "suite.py"), "--quick", "--devices", "cpu",
         "--out", str(tmp_path), "--name", "quick"],
        capture_output=True, text=True, timeout=600,
    )
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
    assert runs[0]["machine"]["torch"]
    table = (tmp_path / "quick.md").read_text()
    assert "| lstm | 2×8×16×16 | forward |" in table and "LSTMCell" in table
    assert (tmp_path / "quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_suite_rejects_an_unknown_device(tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "suite.py"), "--quick", "--devices", "tpu",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2 and "unknown device 'tpu'" in result.stderr
