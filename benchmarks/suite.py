"""The whole speed suite in one command: every cell against its peer in the same run, on every device
given, and one JSON file, one markdown file and one PNG plot of it all.

  recurrent  RNN (tanh, relu), LSTM, GRU vs torch.nn (cuDNN on CUDA): inference forward and
             forward+backward, B×T×I×H 1×256×256×256, 16×128×256×256, 64×128×512×512
             (CUDA adds 64×256×512×512)
  attention  the attention-augmented LSTM and GRU (self memory) vs the eager PyTorch time loop
             (rnnattn_ext.reference) and vs our plain cell of the same size
  step       streaming inference, one step at a time at B=1 (``module.stream`` and
             ``module.streamer()``) vs torch.nn's LSTMCell / GRUCell / RNNCell

Medians over interleaved repeated runs; ratios are peer time / our time (> 1: we are faster), and for
the attention cells also our time / our plain cell's.

    python benchmarks/suite.py                                   # CPU float32 (+ CUDA when visible)
    python benchmarks/suite.py --devices cuda --cuda-dtypes float32,bfloat16
    python benchmarks/suite.py --quick --out /tmp/suite          # tiny shapes: checks that it runs
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_attention  # noqa: E402
import bench_recurrent  # noqa: E402
import bench_step  # noqa: E402
from bench_common import device_name, machine_info  # noqa: E402

RECURRENT_CELLS = ["rnn_tanh", "rnn_relu", "lstm", "gru"]
ATTENTION_CELLS = ["lstm", "gru"]
STEP_CELLS = ["lstm", "gru", "rnn_tanh"]
CUDA_EXTRA_SHAPES = [(64, 256, 512, 512)]
QUICK = {
    "recurrent": [(2, 8, 16, 16)],
    "attention": [(2, 8, 16, 16, 8, 4)],
    "step": [(1, 16, 16)],
}


def run_device(device: str, dtype: torch.dtype, quick: bool, progress) -> dict:
    """Every section on one device and dtype."""
    cpu = device == "cpu"
    repeats = {"recurrent": 1 if quick else 7 if cpu else 20, "attention": 1 if quick else 5 if cpu else 10,
               "step": 1 if quick else 15}
    warmup = 0 if quick else 1
    recurrent_shapes = bench_recurrent.DEFAULT_SHAPES + ([] if cpu else CUDA_EXTRA_SHAPES)
    if quick:
        recurrent_shapes = QUICK["recurrent"]
    sections = {"recurrent": [], "attention": [], "step": []}
    for cell in RECURRENT_CELLS:
        for shape in recurrent_shapes:
            rows = bench_recurrent.bench_pair(cell, shape, device, dtype, repeats["recurrent"], warmup)
            sections["recurrent"].extend(rows)
            for r in rows:
                progress(f"{device} {dtype} {bench_recurrent.progress_line(r)}")
    for cell in ATTENTION_CELLS:
        for shape in QUICK["attention"] if quick else bench_attention.DEFAULT_SHAPES:
            rows = bench_attention.bench_shape(cell, shape, 4, device, dtype, repeats["attention"], warmup,
                                               ["forward", "forward+backward"])
            sections["attention"].extend(rows)
            for r in rows:
                progress(f"{device} {dtype} attention {bench_attention.progress_line(r)}")
    for cell in STEP_CELLS:
        for shape in QUICK["step"] if quick else bench_step.DEFAULT_SHAPES:
            r = bench_step.bench_cell(cell, shape, device, dtype, 8 if quick else 64, repeats["step"], warmup)
            sections["step"].append(r)
            progress(f"{device} {dtype} {bench_step.progress_line(r)}")
    return {"device": device, "dtype": str(dtype).removeprefix("torch."), "repeats": repeats,
            "machine": machine_info(device), "sections": sections}


def markdown(runs: list[dict]) -> str:
    parts = []
    for run in runs:
        device, dtype, info = run["device"], run["dtype"], run["machine"]
        sections = run["sections"]
        parts.append(bench_recurrent.markdown_table(sections["recurrent"], info, device, dtype))
        # The device line heads the first table of a run only.
        parts.append(_drop_device_line(bench_attention.markdown_table(sections["attention"], info, device, dtype)))
        parts.append(_drop_device_line(bench_step.markdown_table(sections["step"], info, device, dtype)))
    return "\n\n".join(parts)


def _drop_device_line(table: str) -> str:
    return table.split("\n", 2)[2]


def plot(runs: list[dict], path: str) -> bool:
    """One panel per device and dtype: every row's speed-up over its peer, log scale, 1x marked.
    False (and no file) when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 1, figsize=(11, 0.28 * max(len(_bars(r)) for r in runs) * len(runs) + 1.5),
                             squeeze=False)
    for ax, run in zip(axes[:, 0], runs):
        bars = _bars(run)
        labels = [b[0] for b in bars]
        values = [b[1] for b in bars]
        colors = [b[2] for b in bars]
        positions = range(len(bars))
        ax.barh(positions, values, color=colors)
        ax.set_yticks(list(positions), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.axvline(1.0, color="black", linewidth=0.8)
        for y, v in zip(positions, values):
            ax.text(v, y, f" {v:.2f}×", va="center", fontsize=6)
        info = run["machine"]
        ax.set_title(f"{device_name(info)} ({run['device']}, {run['dtype']}), torch {info['torch']}, "
                     f"{info['date']}", fontsize=9)
        ax.set_xlabel("speed-up: peer time / rnnattn_ext time (> 1: faster)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _bars(run: dict) -> list[tuple[str, float, str]]:
    peer = "cuDNN" if run["device"] == "cuda" else "torch.nn"
    bars = []
    for r in run["sections"]["recurrent"]:
        bars.append((f"{r['cell']} {r['B']}×{r['T']}×{r['I']}×{r['H']} {r['mode']} vs {peer}", r["ratio"],
                     "tab:blue" if r["mode"] == "forward" else "tab:orange"))
    for r in run["sections"]["attention"]:
        bars.append((f"attn {r['cell']} {r['B']}×{r['T']}×{r['H']} w{r['window']} {r['mode']} vs eager",
                     r["speedup_vs_eager"], "tab:green"))
    for r in run["sections"]["step"]:
        bars.append((f"{r['cell']} stream step B={r['B']} H={r['H']} vs {r['peer']}", r["ratio"], "tab:purple"))
        if r["streamer_ratio"] is not None:
            bars.append((f"{r['cell']} streamer step B={r['B']} H={r['H']} vs {r['peer']}", r["streamer_ratio"],
                         "tab:pink"))
    return bars


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", default=None,
                        help="comma-separated: cpu, cuda (default: cpu, plus cuda when a GPU is visible)")
    parser.add_argument("--cpu-dtypes", default="float32")
    parser.add_argument("--cuda-dtypes", default="float32,bfloat16")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one run each: checks the suite runs")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON, markdown and PNG")
    parser.add_argument("--name", default="suite", help="file name stem")
    args = parser.parse_args(argv)
    devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        if device not in ("cpu", "cuda"):
            parser.error(f"--devices: unknown device {device!r}; choose from cpu, cuda")
        if device == "cuda" and not torch.cuda.is_available():
            parser.error("--devices cuda: no CUDA device is visible")
    runs = []
    for device in devices:
        for name in (args.cpu_dtypes if device == "cpu" else args.cuda_dtypes).split(","):
            dtype = getattr(torch, name, None)
            if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
                parser.error(f"--{device}-dtypes: {name!r} is not a floating-point dtype")
            runs.append(run_device(device, dtype, args.quick, lambda line: print(line, flush=True)))
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, args.name)
    with open(stem + ".json", "w") as f:
        json.dump({"runs": runs}, f, indent=2)
    table = markdown(runs)
    with open(stem + ".md", "w") as f:
        f.write(table + "\n")
    plotted = plot(runs, stem + ".png")
    print()
    print(table)
    plot_note = f", {stem}.png" if plotted else " (no plot: matplotlib is not installed)"
    print(f"\nwrote {stem}.json, {stem}.md{plot_note}")


if __name__ == "__main__":
    main()
