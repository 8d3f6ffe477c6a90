"""The attention-augmented cell (self memory) against the eager PyTorch time loop that users write
today (rnnattn_ext.reference.attention_layer) and against our own plain cell of the same size.

For each shape it times inference forward (no grad) and forward+backward (input, states and every
weight requiring grad), interleaved runs, medians; reports eager / ours (> 1: we are faster) and
ours / plain (how much the attention costs on top of the plain layer), prints a markdown table and
writes JSON and markdown files.

    python benchmarks/bench_attention.py                      # CPU, float32, LSTM
    python benchmarks/bench_attention.py --device cuda --cells lstm,gru
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import (check_common, common_parser, interleaved_median_ms, results_markdown,  # noqa: E402
                          machine_info, write_results)

from rnnattn_ext import functional, reference  # noqa: E402

# B, T, I, H, D (= heads x head_dim), window
DEFAULT_SHAPES = [(1, 256, 256, 256, 64, 64), (16, 128, 256, 256, 64, 128)]
GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


def make_args(cell, shape, heads, device, dtype):
    batch, steps, input_size, hidden, width, _ = shape
    gen = torch.Generator().manual_seed(0)
    g = GATES[cell]

    def rand(*s, scale):
        return ((torch.rand(*s, generator=gen) * 2 - 1) * scale).to(device=device, dtype=dtype)

    k = hidden ** -0.5
    x = rand(steps, batch, input_size, scale=1.0)
    states = [rand(batch, hidden, scale=1.0) for _ in range(2 if cell == "lstm" else 1)]
    base = [rand(g * hidden, input_size, scale=k), rand(g * hidden, hidden, scale=k), rand(g * hidden, scale=k),
            rand(g * hidden, scale=k)]
    attention = [rand(width, hidden, scale=k), rand(width, scale=k), rand(width, hidden, scale=k),
                 rand(width, scale=k), rand(width, hidden, scale=k), rand(width, scale=k),
                 rand(g * hidden, width, scale=width ** -0.5)]
    return x, states, base, attention


def bench_shape(cell, shape, heads, device, dtype, repeats, warmup, modes):
    window = shape[5]
    x, states, base, attention = make_args(cell, shape, heads, device, dtype)
    rows = []
    for mode in modes:
        grad = mode == "forward+backward"
        leaves = [t.clone().requires_grad_(grad) for t in (x, *states, *base, *attention)]
        xg, sg = leaves[0], leaves[1 : 1 + len(states)]
        bg, ag = leaves[1 + len(states) : 5 + len(states)], leaves[5 + len(states) :]

        def finish(y):
            if grad:
                y.sum().backward()

        def eager():
            with torch.set_grad_enabled(grad):
                finish(reference.attention_layer(cell, xg, sg, *bg, *ag, num_heads=heads, window=window)[0])

        def ours():
            with torch.set_grad_enabled(grad):
                finish(functional.attention_layer(cell, xg, sg, (*bg, *ag), heads, window)[0])

        def plain():
            with torch.set_grad_enabled(grad):
                finish(functional.layer(cell, xg, sg, *bg)[0])

        # Two interleaved pairs: the eager loop churns the caches and the allocator, so whatever
        # runs right after it starts cold; ours against plain is timed away from it.
        times = interleaved_median_ms({"ours": ours, "plain": plain}, device, repeats, warmup)
        against_eager = interleaved_median_ms({"eager": eager, "ours": ours}, device, repeats, warmup)
        batch, steps, input_size, hidden, width, _ = shape
        rows.append({
            "cell": cell, "B": batch, "T": steps, "I": input_size, "H": hidden, "D": width, "heads": heads,
            "window": window, "mode": mode, "eager_ms": against_eager["eager"], "ours_ms": times["ours"],
            "plain_ms": times["plain"], "ours_after_eager_ms": against_eager["ours"],
            "speedup_vs_eager": against_eager["eager"] / against_eager["ours"],
            "cost_vs_plain": times["ours"] / times["plain"],
        })
    return rows


def progress_line(r) -> str:
    """One row as the run prints it."""
    return (f"{r['cell']:8s} {r['B']}x{r['T']}x{r['I']}x{r['H']} D{r['D']} w{r['window']} {r['mode']:17s} "
            f"eager {r['eager_ms']:8.2f} ms  ours {r['ours_ms']:7.2f} ms  plain {r['plain_ms']:7.2f} ms  "
            f"{r['speedup_vs_eager']:.1f}x vs eager, {r['cost_vs_plain']:.2f}x plain")


def markdown_table(rows, info, device, dtype) -> str:
    columns = ["cell", "B×T×I×H, D (heads), w", "mode", "eager ms", "ours ms", "plain ms", "eager / ours",
               "ours / plain"]
    return results_markdown(info, device, dtype, columns, 3, [
        [r["cell"], f"{r['B']}×{r['T']}×{r['I']}×{r['H']}, {r['D']} ({r['heads']}), {r['window']}", r["mode"],
         f"{r['eager_ms']:.2f}", f"{r['ours_ms']:.2f}", f"{r['plain_ms']:.2f}", f"{r['speedup_vs_eager']:.1f}×",
         f"{r['cost_vs_plain']:.2f}×"] for r in rows])


def main(argv=None):
    parser = common_parser(__doc__, list(GATES), "lstm", "BxTxIxHxDxW list, e.g. 1x256x256x256x64x64", warmup=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--modes", default="forward,forward+backward")
    args = parser.parse_args(argv)
    dtype, shapes, cells = check_common(parser, args, list(GATES), DEFAULT_SHAPES)
    repeats = args.repeats or (10 if args.device == "cuda" else 5)
    info = machine_info(args.device)
    rows = []
    for cell in cells:
        for shape in shapes:
            if shape[4] % args.heads:
                parser.error(f"--heads {args.heads} must divide D = {shape[4]}")
            for r in bench_shape(cell, shape, args.heads, args.device, dtype, repeats, args.warmup,
                                 args.modes.split(",")):
                rows.append(r)
                print(progress_line(r), flush=True)
    write_results(args, "attention", info, repeats, rows, markdown_table(rows, info, args.device, args.dtype))


if __name__ == "__main__":
    main()
