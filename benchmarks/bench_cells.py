"""The cells in a hand-written time loop: rnnattn_ext.LSTMCell / GRUCell / RNNCell against torch.nn's
cell with the same weights, on the same device, as a decoder or a policy runs them: ``--steps``
steps, each fed the state the step before returned.

Two modes: inference (``torch.no_grad()``: the loop only) and training (the loop, then the backward
of the sum of every step's h through all of them, the gradients accumulating into the weights'
``.grad`` as a training step's do). The table gives the median per-step time and the ratio torch.nn /
ours (> 1: we are faster).

    python benchmarks/bench_cells.py
    python benchmarks/bench_cells.py --shapes 1x256x256,16x256x256,64x512x512
    python benchmarks/bench_cells.py --device cuda
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import (check_common, common_parser, interleaved_median_ms, machine_info,  # noqa: E402
                          results_markdown, rows_of, write_results)

import rnnattn_ext  # noqa: E402

DEFAULT_SHAPES = [(1, 256, 256), (16, 256, 256), (64, 512, 512)]  # B, I, H
# cell -> (torch.nn's cell, ours, keyword arguments)
CELLS = {
    "lstm": (torch.nn.LSTMCell, rnnattn_ext.LSTMCell, {}),
    "gru": (torch.nn.GRUCell, rnnattn_ext.GRUCell, {}),
    "rnn_tanh": (torch.nn.RNNCell, rnnattn_ext.RNNCell, {"nonlinearity": "tanh"}),
}


def run_loop(cell, xs, training: bool) -> None:
    """Steps xs (T, B, I) through `cell` from a zero state; training: then the backward of every h."""
    with torch.set_grad_enabled(training):
        state, total = None, 0
        for x in xs:
            state = cell(x, state)
            if training:
                total = total + (state[0] if isinstance(state, tuple) else state).sum()
        if training:
            total.backward()


def bench_cell(cell, shape, device, dtype, steps, repeats, warmup):
    """One row per mode: the per-step time of torch.nn's cell and of ours, same weights and inputs."""
    torch_cls, our_cls, kwargs = CELLS[cell]
    batch, input_size, hidden = shape
    torch.manual_seed(0)
    peer = torch_cls(input_size, hidden, **kwargs).to(device=device, dtype=dtype)
    ours = our_cls(input_size, hidden, **kwargs).to(device=device, dtype=dtype)
    ours.load_state_dict(peer.state_dict())
    xs = torch.randn(steps, batch, input_size, device=device, dtype=dtype)
    rows = []
    for mode, training in (("inference", False), ("training", True)):
        measured = interleaved_median_ms({"torch.nn": lambda: run_loop(peer, xs, training),
                                          "rnnattn_ext": lambda: run_loop(ours, xs, training)},
                                         device, repeats, warmup)
        rows.append({"cell": cell, "B": batch, "I": input_size, "H": hidden, "mode": mode, "steps": steps,
                     "torch_nn_us": measured["torch.nn"] * 1e3 / steps,
                     "rnnattn_us": measured["rnnattn_ext"] * 1e3 / steps,
                     "ratio": measured["torch.nn"] / measured["rnnattn_ext"]})
    return rows


def progress_line(rows) -> str:
    return "\n".join(f"{r['cell']:9s} {r['B']}x{r['I']}x{r['H']:<5d} {r['mode']:9s}  torch.nn {r['torch_nn_us']:8.1f} "
                     f"us/step  ours {r['rnnattn_us']:8.1f} us/step  {r['ratio']:.2f}x" for r in rows)


def markdown_table(rows, info, device, dtype) -> str:
    columns = ["cell", "B×I×H", "mode", "steps", "torch.nn µs/step", "rnnattn_ext µs/step", "speed-up"]
    return results_markdown(info, device, dtype, columns, 3, [
        [r["cell"], f"{r['B']}×{r['I']}×{r['H']}", r["mode"], str(r["steps"]), f"{r['torch_nn_us']:.1f}",
         f"{r['rnnattn_us']:.1f}", f"{r['ratio']:.2f}×"] for r in rows])


def main(argv=None):
    parser = common_parser(__doc__, list(CELLS), ",".join(CELLS), "B×I×H list, e.g. 1x256x256", warmup=2)
    parser.add_argument("--steps", type=int, default=32, help="steps of the loop per timed run")
    args = parser.parse_args(argv)
    dtype, shapes, cells = check_common(parser, args, list(CELLS), DEFAULT_SHAPES)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    repeats = args.repeats or 11
    info = machine_info(args.device)
    per_shape = rows_of(cells, shapes, lambda cell, shape: bench_cell(cell, shape, args.device, dtype, args.steps,
                                                                       repeats, args.warmup), progress_line)
    rows = [row for pair in per_shape for row in pair]
    write_results(args, "cells", info, repeats, rows, markdown_table(rows, info, args.device, args.dtype))


if __name__ == "__main__":
    main()
