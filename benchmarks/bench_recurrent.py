"""rnnattn_ext recurrent layers against torch.nn on the same device, in the same run.

For each cell and shape it times inference forward (no grad) and forward+backward (input, states
and weights all requiring grad) of torch.nn's module and of ours with the same weights, reports
the median over repeated runs and the ratio torch.nn time / our time (> 1: we are faster), prints
a markdown table and writes JSON and markdown files.

    python benchmarks/bench_recurrent.py --device cpu
    python benchmarks/bench_recurrent.py --device cuda --dtype bfloat16 --out benchmarks/results
    python benchmarks/bench_recurrent.py --layers 2 --bidirectional --packed   # a tagger's encoder

--layers, --bidirectional and --packed (a PackedSequence of lengths drawn in [T/2, T], unsorted, as
pack_padded_sequence(..., enforce_sorted=False) makes it) apply to both modules alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
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


@dataclasses.dataclass(frozen=True)
class Stack:
    """The modules' configuration beyond the cell and shape, and the input's form."""

    layers: int = 1
    bidirectional: bool = False
    packed: bool = False

    def label(self) -> str:
        """What the tables add to the cell's name ("" for one plain layer)."""
        parts = ([f"×{self.layers}"] if self.layers > 1 else []) + (["bi"] if self.bidirectional else [])
        return " ".join(parts + (["packed"] if self.packed else []))


def _input(x: torch.Tensor, stack: Stack):
    """x (T, B, I) as the modules take it: itself, or packed with lengths drawn in [T/2, T] (seeded)."""
    if not stack.packed:
        return x
    steps, batch = x.shape[:2]
    lengths = torch.randint(steps // 2 + 1, steps + 1, (batch,), generator=torch.Generator().manual_seed(0))
    return torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)


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


def bench_pair(cell, shape, device, dtype, repeats, warmup, stack: Stack = Stack()):
    torch_cls, our_cls, kwargs = CELLS[cell]
    kwargs = {**kwargs, "num_layers": stack.layers, "bidirectional": stack.bidirectional}
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
                given = _input(x, stack)

                def run(module=module, given=given):
                    with torch.no_grad():
                        module(given)
            else:
                xg = x.clone().requires_grad_(True)

                def run(module=module, xg=xg):
                    y, _ = module(_input(xg, stack))
                    (y.data if stack.packed else y).sum().backward()
            if label == "torch.nn strict":
                def run(inner=run):
                    with cudnn_strict_fp32():
                        inner()
            fns[label] = run
        times = interleaved_median_ms(fns, device, repeats, warmup)
        row = {
            "cell": cell, "B": batch, "T": steps, "I": input_size, "H": hidden, "mode": mode,
            **({} if stack == Stack() else dataclasses.asdict(stack)),
            "torch_nn_ms": times["torch.nn"], "rnnattn_ms": times["rnnattn_ext"],
            "ratio": times["torch.nn"] / times["rnnattn_ext"],
        }
        if strict:
            row["torch_nn_strict_fp32_ms"] = times["torch.nn strict"]
            row["ratio_strict_fp32"] = times["torch.nn strict"] / times["rnnattn_ext"]
        rows.append(row)
    return rows


def _cell_label(r) -> str:
    """The row's cell, with its stack's label when it has one."""
    label = Stack(r.get("layers", 1), r.get("bidirectional", False), r.get("packed", False)).label()
    return f"{r['cell']} {label}" if label else r["cell"]


def progress_line(r) -> str:
    """One row as the run prints it."""
    line = (f"{_cell_label(r):9s} {r['B']}x{r['T']}x{r['I']}x{r['H']:<5d} {r['mode']:17s} "
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
        cells = [_cell_label(r), f"{r['B']}×{r['T']}×{r['I']}×{r['H']}", r["mode"], f"{r['torch_nn_ms']:.2f}",
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
    parser.add_argument("--layers", type=int, default=1, help="num_layers of both modules")
    parser.add_argument("--bidirectional", action="store_true", help="bidirectional modules")
    parser.add_argument("--packed", action="store_true", help="a PackedSequence input (lengths in [T/2, T])")
    args = parser.parse_args(argv)
    if args.layers < 1:
        parser.error(f"--layers must be >= 1, got {args.layers}")
    stack = Stack(args.layers, args.bidirectional, args.packed)
    dtype, shapes, cells = check_common(parser, args, list(CELLS), DEFAULT_SHAPES)
    repeats = args.repeats or (20 if args.device == "cuda" else 7)
    info = machine_info(args.device)
    rows = []
    for cell in cells:
        for shape in shapes:
            rows.extend(bench_pair(cell, shape, args.device, dtype, repeats, args.warmup, stack))
            for r in rows[-2:]:
                print(progress_line(r), flush=True)
    write_results(args, "recurrent", info, repeats, rows, markdown_table(rows, info, args.device, args.dtype))


if __name__ == "__main__":
    main()
