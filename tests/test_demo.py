"""The demo (python -m rnnattn_ext.demo) end to end on a tiny setting, its resumable checkpoints and
its data split."""

import json
import os
import subprocess
import sys

import pytest
import torch

from rnnattn_ext.demo import data

pytest.importorskip("tqdm", reason="the demo's progress bars need tqdm (scripts/setup.sh installs it)")
pytest.importorskip("matplotlib", reason="the demo's plot needs matplotlib (scripts/setup.sh installs it)")

TINY = ["--steps", "4", "--eval-every", "2", "--batch", "4", "--seq-len", "16", "--embed", "8", "--hidden", "16",
        "--heads", "2", "--head-dim", "4", "--window", "4", "--max-chars", "20000", "--eval-windows", "4",
        "--final-eval-windows", "8", "--sample-length", "30", "--no-progress", "--device", "cpu"]


def run_demo(*args, expect_ok=True):
    result = subprocess.run([sys.executable, "-m", "rnnattn_ext.demo", *args], capture_output=True, text=True,
                            timeout=900)
    if expect_ok:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    result = run_demo(*TINY, "--out", str(out))
    with open(out / "summary.json") as f:
        return out, json.load(f), result.stdout


def test_demo_trains_three_models_and_reports(tiny_run):
    out, summary, stdout = tiny_run
    assert set(summary["models"]) == {"attn_lstm", "lstm", "torch_lstm"}
    for kind, r in summary["models"].items():
        assert len(r["train_bpc"]) == 4
        assert [p[0] for p in r["eval_points"]] == [2, 4]
        assert 0 < r["held_out_bpc"] < 8  # 7 bits is a uniform guess over the 128 codes
        assert r["tokens_per_second"] > 0
    # Our LSTM is torch.nn.LSTM's function with the same initial weights and batches.
    assert summary["models"]["lstm"]["held_out_bpc"] == pytest.approx(summary["models"]["torch_lstm"]["held_out_bpc"],
                                                                      rel=1e-4)
    assert summary["best"] in summary["models"]
    assert summary["sample"]["text"].startswith("def ") and len(summary["sample"]["text"]) == 4 + 30
    assert (out / "sample.txt").read_text().startswith("def ")
    assert (out / "learning_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "held-out bits/char" in stdout
    for kind in summary["models"]:
        assert (out / "checkpoints" / f"{kind}.pt").exists()


def test_resuming_from_checkpoints_continues_the_same_run(tiny_run, tmp_path):
    # 4 steps then resumed to 6 trains exactly as 6 steps at once: same batches, optimizer state restored.
    out, _, _ = tiny_run
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "checkpoints").mkdir()
    for kind in ("lstm", "attn_lstm"):
        (resumed / "checkpoints" / f"{kind}.pt").write_bytes((out / "checkpoints" / f"{kind}.pt").read_bytes())
    six = [a if a != "4" or i == 0 or TINY[i - 1] != "--steps" else "6" for i, a in enumerate(TINY)]
    run_demo(*six, "--models", "lstm,attn_lstm", "--out", str(resumed), "--resume")
    run_demo(*six, "--models", "lstm,attn_lstm", "--out", str(tmp_path / "straight"))
    with open(resumed / "summary.json") as f:
        a = json.load(f)["models"]
    with open(tmp_path / "straight" / "summary.json") as f:
        b = json.load(f)["models"]
    for kind in ("lstm", "attn_lstm"):
        assert [p[0] for p in a[kind]["eval_points"]] == [2, 4, 6]
        assert a[kind]["train_bpc"] == b[kind]["train_bpc"]
        assert a[kind]["held_out_bpc"] == b[kind]["held_out_bpc"]


def test_resuming_with_other_settings_is_refused(tiny_run, tmp_path):
    out, _, _ = tiny_run
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "lstm.pt").write_bytes((out / "checkpoints" / "lstm.pt").read_bytes())
    changed = [a if a != "16" or TINY[i - 1] != "--hidden" else "24" for i, a in enumerate(TINY)]
    result = run_demo(*changed, "--models", "lstm", "--out", str(tmp_path), "--resume", expect_ok=False)
    assert result.returncode != 0 and "trained with other settings" in result.stderr and "hidden" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--models", "gru"], "unknown model 'gru'"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--prompt", ""], "--prompt must be non-empty ASCII"),
])
def test_bad_options_are_named(args, message, tmp_path):
    result = run_demo(*TINY, *args, "--out", str(tmp_path), expect_ok=False)
    assert result.returncode == 2 and message in result.stderr


def test_split_is_by_file_and_follows_the_seed():
    a = data.load_corpus(seed=1, max_chars=200_000)
    b = data.load_corpus(seed=1, max_chars=200_000)
    c = data.load_corpus(seed=2, max_chars=200_000)
    assert a.train_files == b.train_files and a.held_out_files == b.held_out_files
    assert torch.equal(a.train, b.train) and torch.equal(a.held_out, b.held_out)
    assert not set(a.train_files) & set(a.held_out_files)
    assert a.held_out_files != c.held_out_files
    assert a.train.numel() == 200_000 and a.held_out.numel() == 20_000
    assert int(a.train.max()) < data.VOCAB and int(a.train.min()) >= 0
    assert all(os.path.basename(p).endswith(".py") and "site-packages" not in p for p in a.train_files)


def test_encoding_round_trips_ascii_and_marks_the_rest():
    assert data.decode(data.encode("def f(x):\n\treturn x")) == "def f(x):\n\treturn x"
    assert data.decode(data.encode("naïve")) == "na?ve"
