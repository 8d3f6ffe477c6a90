"""rnnattn_ext recurrent layers against torch.nn on the same device, in the same run.

For each cell and shape it times inference forward (no grad) and forward+backward (input, states
and weights all requiring grad) of torch.nn's module and of ours with the same weights, reports
the median over repeated runs and the ratio torch.nn time / our time (> 1: we are faster), prints
a markdown table and writes JSON and markdown files.

    python benchmarks/bench_recurrent.py --device cpu
    python benchmarks/bench_recurrent.py --device cuda --dtype bfloat16 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import torch

import rnnattn_ext

DEFAULT_SHAPES = [(1, 256, 256, 256), (16, 128, 256, 256), (64, 128, 512, 512)]
CELLS = {
    "lstm": (torch.nn.LSTM, rnnattn_ext.LSTM, {}),
    "gru": (torch.nn.GRU, rnnattn_ext.GRU, {}),
    "rnn_tanh": (torch.nn.RNN, rnnattn_ext.RNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (torch.nn.RNN, rnnattn_ext.RNN, {"nonlinearity": "relu"}),
}


def machine_info(device: str) -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "rnnattn_ext": rnnattn_ext.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _time_once_ms(fn, device: str) -> float:
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def interleaved_median_ms(fns: dict, device: str, repeats: int, warmup: int) -> dict:
    """Median time of each function, the runs interleaved (A B A B ...) so that drifts in the
    machine's speed hit every contender alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    if device == "cuda":
        torch.cuda.synchronize()
    times = {label: [] for label in fns}
    for _ in range(repeats):
        for label, fn in fns.items():
            times[label].append(_time_once_ms(fn, device))
    return {label: statistics.median(ts) for label, ts in times.items()}


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


def markdown_table(rows, info, device, dtype) -> str:
    peer = "cuDNN (torch.nn)" if device == "cuda" else "torch.nn"
    lines = [
        f"Device: {info.get('gpu', info['cpu'])} ({device}, {info['cpu_threads']} CPU threads), dtype {dtype}, "
        f"torch {info['torch']}, {info['date']}",
        "",
        f"| cell | B×T×I×H | mode | {peer} ms | rnnattn_ext ms | speed-up |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['cell']} | {r['B']}×{r['T']}×{r['I']}×{r['H']} | {r['mode']} | {r['torch_nn_ms']:.2f} | "
            f"{r['rnnattn_ms']:.2f} | {r['ratio']:.2f}× |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    parser.add_argument("--cells", default=",".join(CELLS), help="comma-separated: " + ", ".join(CELLS))
    parser.add_argument("--shapes", default=None, help="B×T×I×H list, e.g. 1x256x256x256,16x128x256x256")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (median taken)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON and markdown output")
    parser.add_argument("--name", default=None, help="file name stem (default: recurrent_<device>_<dtype>)")
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    dtype = getattr(torch, args.dtype)
    shapes = DEFAULT_SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    repeats = args.repeats or (20 if args.device == "cuda" else 7)
    info = machine_info(args.device)
    rows = []
    for cell in args.cells.split(","):
        if cell not in CELLS:
            parser.error(f"--cells: unknown cell {cell!r}; choose from {', '.join(CELLS)}")
        for shape in shapes:
            rows.extend(bench_pair(cell, shape, args.device, dtype, repeats, args.warmup))
            for r in rows[-2:]:
                print(f"{r['cell']:9s} {r['B']}x{r['T']}x{r['I']}x{r['H']:<5d} {r['mode']:17s} "
                      f"torch.nn {r['torch_nn_ms']:9.2f} ms  ours {r['rnnattn_ms']:9.2f} ms  {r['ratio']:.2f}x",
                      flush=True)
    table = markdown_table(rows, info, args.device, args.dtype)
    print()
    print(table)
    os.makedirs(args.out, exist_ok=True)
    stem = args.name or f"recurrent_{args.device}_{args.dtype}"
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
        json.dump({"machine": info, "device": args.device, "dtype": args.dtype, "repeats": repeats,
                   "rows": rows}, f, indent=2)
    with open(os.path.join(args.out, stem + ".md"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
