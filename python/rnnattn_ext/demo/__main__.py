"""python -m rnnattn_ext.demo: trains character language models on the standard library's sources
and compares them.

Three models, the same data, batches and number of steps: our attention-augmented LSTM (self memory
over a window of past states), our LSTM, and torch.nn.LSTM (the speed reference: ours computes the
same function). Reports held-out bits per character at equal steps and at equal training time,
tokens per second, a plot of the learning curves, a JSON summary, and a text sample from the best
model, generated one character at a time through the streaming API.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, fields

import torch

from .. import __version__
from . import data
from .models import KINDS, LABELS
from .train import Config, History, held_out_bpc, train


def parse_args(argv=None) -> tuple[argparse.Namespace, Config]:
    defaults = Config()
    parser = argparse.ArgumentParser(prog="python -m rnnattn_ext.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(Config):
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(defaults, f.name)),
                            default=getattr(defaults, f.name), metavar=f.name.upper())
    parser.add_argument("--models", default=",".join(KINDS), help=f"comma-separated, from {', '.join(KINDS)}")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    parser.add_argument("--out", default="demo_out", help="folder for the summary, plot, sample and checkpoints")
    parser.add_argument("--resume", action="store_true",
                        help="continue each model from its checkpoint in --out up to --steps")
    parser.add_argument("--sample-length", type=int, default=400)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--prompt", default="def ")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    config = Config(**{f.name: getattr(args, f.name) for f in fields(Config)})
    for name in ("steps", "batch", "seq_len", "embed", "hidden", "layers", "heads", "head_dim", "window",
                 "eval_every", "eval_windows", "final_eval_windows", "max_chars"):
        if getattr(config, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(config, name)}")
    if not config.lr > 0 or not args.temperature > 0:
        parser.error("--lr and --temperature must be > 0")
    args.models = args.models.split(",")
    for kind in args.models:
        if kind not in KINDS:
            parser.error(f"--models: unknown model {kind!r}; choose from {', '.join(KINDS)}")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is visible")
    if any(ord(c) >= data.VOCAB for c in args.prompt) or not args.prompt:
        parser.error("--prompt must be non-empty ASCII text")
    return args, config


def at_time(points: list[tuple[int, float, float]], seconds: float) -> float:
    """Held-out bits per character after `seconds` of training, interpolated along the curve."""
    previous = (0, 0.0, points[0][2])
    for point in points:
        if point[1] >= seconds:
            span = point[1] - previous[1]
            weight = 1.0 if span <= 0 else (seconds - previous[1]) / span
            return previous[2] + weight * (point[2] - previous[2])
        previous = point
    return points[-1][2]


def plot(histories: dict[str, History], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    for kind, history in histories.items():
        steps = [p[0] for p in history.eval_points]
        seconds = [p[1] for p in history.eval_points]
        bpc = [p[2] for p in history.eval_points]
        by_step.plot(range(1, len(history.train_bpc) + 1), history.train_bpc, alpha=0.25, linewidth=0.8)
        color = by_step.get_lines()[-1].get_color()
        by_step.plot(steps, bpc, marker="o", markersize=3, color=color, label=f"{LABELS[kind]} (held-out)")
        by_time.plot(seconds, bpc, marker="o", markersize=3, color=color, label=LABELS[kind])
    by_step.set_xlabel("training step")
    by_step.set_ylabel("bits per character (faint: training batches)")
    by_time.set_xlabel("training time (s)")
    by_time.set_ylabel("held-out bits per character")
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Character language models on the Python standard library's sources")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def check_dependencies() -> None:
    missing = []
    for name in ("tqdm", "matplotlib"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        sys.exit(f"rnnattn_ext.demo needs {' and '.join(missing)}: pip install {' '.join(missing)} "
                 "(scripts/setup.sh installs them)")


def main(argv=None) -> dict:
    args, config = parse_args(argv)
    check_dependencies()
    device = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)
    print(f"rnnattn_ext {__version__}, torch {torch.__version__}, device {device}, "
          f"{torch.get_num_threads()} CPU threads")
    corpus = data.load_corpus(config.seed, config.max_chars)
    print(f"text: {corpus.train.numel():,} training characters from {len(corpus.train_files)} files, "
          f"{corpus.held_out.numel():,} held-out characters from {len(corpus.held_out_files)} other files of "
          f"{corpus.root}")
    print(f"{config.steps} steps of {config.batch} x {config.seq_len} characters per model", flush=True)

    histories, models = {}, {}
    for kind in args.models:
        models[kind], histories[kind] = train(kind, config, corpus, device, args.out, args.resume,
                                              not args.no_progress)
    final_windows = data.evaluation_windows(corpus.held_out, config.seq_len, config.final_eval_windows)
    tokens = config.batch * config.seq_len
    common_seconds = min(h.train_seconds for h in histories.values())
    results: dict[str, dict] = {}
    for kind, history in histories.items():
        results[kind] = {
            "label": LABELS[kind],
            "parameters": sum(p.numel() for p in models[kind].parameters()),
            "held_out_bpc": held_out_bpc(models[kind], final_windows, device, config.batch),
            "held_out_bpc_at_equal_time": at_time(history.eval_points, common_seconds),
            "train_seconds": history.train_seconds,
            "tokens_per_second": config.steps * tokens / history.train_seconds,
            "eval_points": history.eval_points,
            "train_bpc": history.train_bpc,
        }
    best = min(results, key=lambda k: results[k]["held_out_bpc"])
    generator = torch.Generator().manual_seed(config.seed)
    started = time.perf_counter()
    produced = models[best].generate(data.encode(args.prompt), args.sample_length, args.temperature, generator)
    sample_seconds = time.perf_counter() - started
    sample = args.prompt + data.decode(produced)

    summary = {
        "rnnattn_ext": __version__, "torch": torch.__version__, "python": platform.python_version(),
        "device": str(device), "cpu_threads": torch.get_num_threads(), "config": asdict(config),
        "corpus": {"source": f"the .py files of the Python {platform.python_version()} standard library",
                   "train_chars": corpus.train.numel(), "train_files": len(corpus.train_files),
                   "held_out_chars": corpus.held_out.numel(),
                   "held_out_files": [os.path.relpath(p, corpus.root) for p in corpus.held_out_files],
                   "final_eval_chars": final_windows[:, 1:].numel()},
        "equal_time_seconds": common_seconds, "models": results, "best": best,
        "sample": {"model": best, "prompt": args.prompt, "temperature": args.temperature, "text": sample,
                   "characters_per_second": args.sample_length / sample_seconds},
    }
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(args.out, "sample.txt"), "w") as f:
        f.write(sample + "\n")
    plot(histories, os.path.join(args.out, "learning_curves.png"))

    print()
    print(f"| model | parameters | held-out bits/char after {config.steps} steps | "
          f"held-out bits/char after {common_seconds:.0f} s | tokens/s |")
    print("|---|---:|---:|---:|---:|")
    for kind, r in results.items():
        print(f"| {r['label']} | {r['parameters']:,} | {r['held_out_bpc']:.3f} | "
              f"{r['held_out_bpc_at_equal_time']:.3f} | {r['tokens_per_second']:,.0f} |")
    print(f"\n(held-out: {final_windows[:, 1:].numel():,} characters of files no model trained on; the equal-time "
          f"column reads each model's learning curve, measured on {min(config.eval_windows, final_windows.shape[0])} "
          f"windows, at the training time of the fastest)")
    print(f"\nSample from {LABELS[best]} (streamed, {args.sample_length / sample_seconds:,.0f} characters/s):\n")
    print(sample)
    print(f"\nwrote {os.path.join(args.out, 'summary.json')}, learning_curves.png, sample.txt, checkpoints/")
    sys.stdout.flush()
    return summary


if __name__ == "__main__":
    main()
