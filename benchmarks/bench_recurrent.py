"""rnnattn_ext recurrent layers against torch.nn on the same device, in the same run.

For each cell and shape it times inference forward (no grad) and forward+backward (input, states
and weights all requiring grad) of torch.nn's module and of ours with the same weights, reports
the median over repeated runs and the ratio torch.nn time / our time (> 1: we are faster), prints
a markdown table and writes JSON and markdown files.

    python benchmarks/bench_recurrent.py --device cpu
    python benchmarks/bench_recurrent.py --device cuda --dtype bfloat16 --out benchmarks/results
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings

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


def _set_cudnn_tf32(allowed: bool) -> bool:
    """Sets torch.backends.cudnn.allow_tf32; returns the value it had."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # newer torch suggests its fp32_precision settings instead
        previous = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = allowed
    return previous


@contextlib.contextmanager
def cudnn_strict_fp32():
    """cuDNN with TF32 off. torch lets cuDNN's float32 RNNs multiply in TF32 by default
    (torch.backends.cudnn.allow_tf32; an error ~5e-4 against float64 where strict float32 gives
    ~7e-7), while ours, like torch's float32 matmuls, stays in float32: this peer has our numerics."""
    previous = _set_cudnn_tf32(False)
    try:
        yield
    finally:
        _set_cudnn_tf32(previous)


def bench_pair(cell, shape, device, dtype, repeats, warmup):
    torch_cls, our_cls, kwargs = CELLS[cell]
    batch, steps, input_size, hidden = shape
    torch.manual_seed(0)
    reference = torch_cls(input_size, hidden, **kwargs).to(device=device, dtype=dtype)
    reference.flatten_parameters()  # cuDNN's packed weight buffer, as a training script would have it
    ours = our_cls(input_size, hidden, **kwargs).to(device=device, dtype=dtype)
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(steps, batch, input_size, device=device, dtype=dtype)
    # On CUDA in float32, cuDNN twice: as torch runs it by default (TF32) and in strict float32.
    strict = device == "cuda" and dtype == torch.float32
    contenders = [("torch.nn", reference), ("rnnattn_ext", ours)] + ([("torch.nn strict", reference)] if strict else [])
    rows = []
    for mode in ("forward", "forward+backward"):
        fns = {}
        for label, module in contenders:
            if mode == "forward":
                def run(module=module):
                    with torch.no_grad():
                        module(x)
            else:
                xg = x.clone().requires_grad_(True)

                def run(module=module, xg=xg):
                    y, _ = module(xg)
                    y.sum().backward()
            if label == "torch.nn strict":
                def run(inner=run):
                    with cudnn_strict_fp32():
                        inner()
            fns[label] = run
        times = interleaved_median_ms(fns, device, repeats, warmup)
        row = {
            "cell": cell, "B": batch, "T": steps, "I": input_size, "H": hidden, "mode": mode,
            "torch_nn_ms": times["torch.nn"], "rnnattn_ms": times["rnnattn_ext"],
            "ratio": times["torch.nn"] / times["rnnattn_ext"],
        }
        if strict:
            row["torch_nn_strict_fp32_ms"] = times["torch.nn strict"]
            row["ratio_strict_fp32"] = times["torch.nn strict"] / times["rnnattn_ext"]
        rows.append(row)
    return rows


def progress_line(r) -> str:
    """One row as the run prints it."""
    line = (f"{r['cell']:9s} {r['B']}x{r['T']}x{r['I']}x{r['H']:<5d} {r['mode']:17s} "
            f"torch.nn {r['torch_nn_ms']:9.2f} ms  ours {r['rnnattn_ms']:9.2f} ms  {r['ratio']:.2f}x")
    if "ratio_strict_fp32" in r:
        line += f"  (strict fp32 cuDNN {r['torch_nn_strict_fp32_ms']:.2f} ms, {r['ratio_strict_fp32']:.2f}x)"
    return line


def markdown_table(rows, info, device, dtype) -> str:
    peer = "cuDNN (torch.nn)" if device == "cuda" else "torch.nn"
    columns = ["cell", "B×T×I×H", "mode", f"{peer} ms", "rnnattn_ext ms", "speed-up"]
    strict = any("ratio_strict_fp32" in r for r in rows)
    if strict:
        columns += ["cuDNN strict fp32 ms", "speed-up vs strict fp32"]
    table = []
    for r in rows:
        cells = [r["cell"], f"{r['B']}×{r['T']}×{r['I']}×{r['H']}", r["mode"], f"{r['torch_nn_ms']:.2f}",
                 f"{r['rnnattn_ms']:.2f}", f"{r['ratio']:.2f}×"]
        if strict:
            cells += [f"{r['torch_nn_strict_fp32_ms']:.2f}", f"{r['ratio_strict_fp32']:.2f}×"]
        table.append(cells)
    text = results_markdown(info, device, dtype, columns, 3, table)
    if strict:
        text += ("\n\ncuDNN runs float32 RNNs in TF32 by default (torch.backends.cudnn.allow_tf32); "
                 "the strict-fp32 columns time it with TF32 off, the numerics ours keep.")
    return text


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
