"""What the benchmarks share: machine facts, interleaved timing, the common command-line options and
the JSON + markdown output."""

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
import rnnattn_ext.info


def machine_info(device: str) -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "rnnattn_ext": rnnattn_ext.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_detail": _cpu_detail(),
        "cpu_threads": torch.get_num_threads(),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def _first_cpu_fields() -> dict:
    """The first CPU's block of /proc/cpuinfo as {field: value} (empty where there is none)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def _cpu_name() -> str:
    return _first_cpu_fields().get("model name") or platform.processor() or "unknown"


def _cpu_detail() -> str:
    """What tells two CPUs of one model name apart (a virtual machine's "AMD EPYC" may be a Zen 1 or a
    Zen 4, whose caches and vector units differ): family and model, each core's L2, and the build of
    our CPU kernels that runs. Parts that cannot be read are left out."""
    parts = []
    fields = _first_cpu_fields()
    if "cpu family" in fields and "model" in fields:
        parts.append(f"family {fields['cpu family']} model {fields['model']}")
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index2/size") as f:
            parts.append(f"L2 {f.read().strip()} per core")
    except OSError:
        pass
    parts.append(f"CPU kernels {rnnattn_ext.info.cpu_kernels()}")
    return ", ".join(parts)


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


def device_name(info: dict) -> str:
    """The GPU's name, or the CPU's with the details that tell its kind apart (runs without them: the name)."""
    if "gpu" in info:
        return info["gpu"]
    return f"{info['cpu']} ({info['cpu_detail']})" if "cpu_detail" in info else info["cpu"]


def device_line(info: dict, device: str, dtype: str) -> str:
    """The first line of every results table: the machine, versions and date."""
    return (f"Device: {device_name(info)} ({device}, {info['cpu_threads']} CPU threads), dtype {dtype}, "
            f"torch {info['torch']}, {info['date']}")


def results_markdown(info: dict, device: str, dtype: str, columns: list[str], left: int, rows: list[list[str]]) -> str:
    """A results table under its device line: `columns` the headers (the first `left` left-aligned,
    the rest numbers, right-aligned), `rows` the cells of each row."""
    lines = [device_line(info, device, dtype), "", "| " + " | ".join(columns) + " |",
             "|" + "---|" * left + "---:|" * (len(columns) - left)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def common_parser(description: str, cells: list[str], default_cells: str, shapes_help: str,
                  warmup: int) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    parser.add_argument("--cells", default=default_cells, help="comma-separated: " + ", ".join(cells))
    parser.add_argument("--shapes", default=None, help=shapes_help)
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (median taken)")
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON and markdown output")
    parser.add_argument("--name", default=None, help="file name stem (default: <benchmark>_<device>_<dtype>)")
    return parser


def check_common(parser: argparse.ArgumentParser, args: argparse.Namespace, cells: list[str], default_shapes):
    """Validates the common options; returns (dtype, shapes, the chosen cells)."""
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    chosen = args.cells.split(",")
    for cell in chosen:
        if cell not in cells:
            parser.error(f"--cells: unknown cell {cell!r}; choose from {', '.join(cells)}")
    shapes = default_shapes
    if args.shapes:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    return getattr(torch, args.dtype), shapes, chosen


def check_attention_shapes(parser: argparse.ArgumentParser, shapes, heads: int, last: str) -> None:
    """The attention benchmarks' shapes: B×I×H×D×<last>, D a multiple of the heads."""
    for shape in shapes:
        if len(shape) != 5 or shape[3] % heads != 0:
            parser.error(f"--shapes: each shape is B×I×H×D×{last} with D a multiple of {heads}, got {shape}")


def rows_of(cells, shapes, bench, progress_line) -> list:
    """bench(cell, shape) for every cell and shape, each row printed as it comes."""
    rows = []
    for cell in cells:
        for shape in shapes:
            row = bench(cell, shape)
            rows.append(row)
            print(progress_line(row), flush=True)
    return rows


def write_results(args: argparse.Namespace, benchmark: str, info: dict, repeats: int, rows: list, table: str):
    """Prints the table and writes <stem>.json and <stem>.md under --out."""
    print()
    print(table)
    os.makedirs(args.out, exist_ok=True)
    stem = args.name or f"{benchmark}_{args.device}_{args.dtype}"
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
        json.dump({"machine": info, "device": args.device, "dtype": args.dtype, "repeats": repeats, "rows": rows},
                  f, indent=2)
    with open(os.path.join(args.out, stem + ".md"), "w") as f:
        f.write(table + "\n")


def attention_step_main(argv, doc: str, cells: dict, default_shapes, heads: int, last: str, example: str,
                        steps_help: str, benchmark: str, bench_cell, progress_line, markdown_table) -> None:
    """The command line of the attention step benchmarks (shapes B×I×H×D×<last>, D a multiple of the
    heads, and --steps): bench_cell(cell, shape, device, dtype, steps, repeats, warmup) for every cell
    and shape, then the results written as every benchmark writes them."""
    parser = common_parser(doc, list(cells), ",".join(cells), f"B×I×H×D×{last} list, e.g. {example}", warmup=2)
    parser.add_argument("--steps", type=int, default=64, help=steps_help)
    args = parser.parse_args(argv)
    dtype, shapes, chosen = check_common(parser, args, list(cells), default_shapes)
    check_attention_shapes(parser, shapes, heads, last)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    repeats = args.repeats or 15
    info = machine_info(args.device)
    rows = rows_of(chosen, shapes, lambda cell, shape: bench_cell(cell, shape, args.device, dtype, args.steps, repeats,
                                                                   args.warmup), progress_line)
    write_results(args, benchmark, info, repeats, rows, markdown_table(rows, info, args.device, args.dtype))
