"""rnnattn_ext recurrent layers against torch.nn on the same device, in the same run.

For each cell and shape it times inference forward (no grad) and forward+backward (input, states
and weights all requiring grad) of torch.nn's module and of ours with the same weights, reports
the median over repeated runs and the ratio torch.nn time / our time (> 1: we are faster), prints
a markdown table and writes JSON and markdown files.

    python benchmarks/bench_recurrent.py --device cpu
    python benchmarks/bench_recurrent.py --device cuda --dtype bfloat16 --out benchmarks/results
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import (check_common, common_parser, interleaved_median_ms, results_markdown,  # noqa: E402
                          machine_info, write_results)

import rnnattn_ext  # noqa: E402

DEFAULT_SHAPES = [(1, 256, 256, 256), (16, 128, 256, 256), (64, 128, 512, 512)]
CELLS = {
    "lstm": (torch.nn.LSTM, rnnattn_ext.LSTM, {}),
    "gru": (torch.nn.GRU, rnnattn_ext.GRU, {}),
    "rnn_tanh": (torch.nn.RNN, rnnattn_ext.RNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (torch.nn.RNN, rnnattn_ext.RNN, {"nonlinearity": "relu"}),
}


def bench_pair(cell, shape, device, dtype, repeats, warmup):
    torch_cls, our_cls, kwargs = CELLS[cell]
    batch, steps, input_size, hidden = shape
    torch.manual_seed(0)
    reference = torch_cls(input_size, hidden, **kwargs).to(device=device, dtype=dtype)
    reference.flatten_parameters()  # cuDNN's packed weight buffer, as a training script would have it
    ours = our_cls(input_size, hidden, **kwargs).to(device=device, dtype=dtype)
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(steps, batch, input_size, device=device, dtype=dtype)
    rows = []
    for mode in ("forward", "forward+backward"):
        fns = {}
        for label, module in (("torch.nn", reference), ("rnnattn_ext", ours)):
            if mode == "forward":
                def run(module=module):
                    with torch.no_grad():
                        module(x)
            else:
                xg = x.clone().requires_grad_(True)

                def run(module=module, xg=xg):
                    y, _ = module(xg)
                    y.sum().backward()
            fns[label] = run
        times = interleaved_median_ms(fns, device, repeats, warmup)
        rows.append({
            "cell": cell, "B": batch, "T": steps, "I": input_size, "H": hidden, "mode": mode,
            "torch_nn_ms": times["torch.nn"], "rnnattn_ms": times["rnnattn_ext"],
            "ratio": times["torch.nn"] / times["rnnattn_ext"],
        })
    return rows


def progress_line(r) -> str:
    """One row as the run prints it."""
    return (f"{r['cell']:9s} {r['B']}x{r['T']}x{r['I']}x{r['H']:<5d} {r['mode']:17s} "
            f"torch.nn {r['torch_nn_ms']:9.2f} ms  ours {r['rnnattn_ms']:9.2f} ms  {r['ratio']:.2f}x")


def markdown_table(rows, info, device, dtype) -> str:
    peer = "cuDNN (torch.nn)" if device == "cuda" else "torch.nn"
    columns = ["cell", "B×T×I×H", "mode", f"{peer} ms", "rnnattn_ext ms", "speed-up"]
    return results_markdown(info, device, dtype, columns, 3, [
        [r["cell"], f"{r['B']}×{r['T']}×{r['I']}×{r['H']}", r["mode"], f"{r['torch_nn_ms']:.2f}",
         f"{r['rnnattn_ms']:.2f}", f"{r['ratio']:.2f}×"] for r in rows])


def main(argv=None):
    parser = common_parser(__doc__, list(CELLS), ",".join(CELLS),
                           "B×T×I×H list, e.g. 1x256x256x256,16x128x256x256", warmup=2)
    args = parser.parse_args(argv)
    dtype, shapes, cells = check_common(parser, args, list(CELLS), DEFAULT_SHAPES)
    repeats = args.repeats or (20 if args.device == "cuda" else 7)
    info = machine_info(args.device)
    rows = []
    for cell in cells:
        for shape in shapes:
            rows.extend(bench_pair(cell, shape, args.device, dtype, repeats, args.warmup))
            for r in rows[-2:]:
                print(progress_line(r), flush=True)
    write_results(args, "recurrent", info, repeats, rows, markdown_table(rows, info, args.device, args.dtype))


if __name__ == "__main__":
    main()
