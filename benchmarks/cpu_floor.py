"""What this CPU allows a recurrent layer, measured with the library's own GEMM kernels: how fast one
thread's share of the per-step product runs when every thread runs its own at once (as in the
engine's time loop), and what that makes the least time of the suite's CPU shapes. A row of the suite
near its floor here has nothing left to gain on this machine but by reading fewer bytes or doing
fewer multiply-adds; the suite's targets are judged against these.

    python benchmarks/cpu_floor.py                 # hidden 256, every usable CPU, the kernels' build that runs
    python benchmarks/cpu_floor.py --hidden 512 --threads 1

It compiles benchmarks/cpu_floor.cpp with csrc/engine/cpu/packed_gemm_<build>.cpp under the flags
CMakeLists.txt gives that build (a C++ compiler is needed; x86 only: the baseline build is not timed).
Cases, per thread, with n = G*H/threads rows of the weights (G gates: LSTM 4, GRU 3, RNN 1):
  step B=1     one row by the thread's packed rows of W_hh (n x H): a step at batch 1 reads them all
  stream B=1   one row by its rows of W_ih and of W_hh read in place (2n x H): a one-step call
  step B=16    16 rows by its packed rows of W_hh: a step at batch 16
  GEMM 64      64 rows by its packed rows: the large products (input projection, weight gradients)
Floors (least times, ms): B=1 forward = T x step B=1 + the input projection (T rows) at the GEMM 64
rate; B=16 forward = every multiply-add of the layer at the step B=16 rate (the input projection
runs at least as fast); the backward repeats the forward's products (dh step by step, dx) and adds
the weight gradients' (as many multiply-adds as the forward) at the GEMM 64 rate.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1}
# (B, T, I, H) of the suite's CPU shapes whose floors are printed (the hidden size is --hidden's).
SUITE_SHAPES = [(1, 256), (16, 128)]


def cpu_kernel_flags(root: Path = ROOT) -> dict[str, list[str]]:
    """The flags CMakeLists.txt compiles the CPU kernels with: "common", "avx2", "avx512", "bf16" (the
    bfloat16 GEMM's, given when the compiler takes them)."""
    cmake = (root / "CMakeLists.txt").read_text()
    common = re.search(
        r"set_source_files_properties\(\$\{CPU_KERNEL_SOURCES\}\s+PROPERTIES COMPILE_OPTIONS \"([^\"]*)\"", cmake)
    avx2 = re.search(r"packed_gemm_avx2\.cpp[^)]*?APPEND PROPERTY COMPILE_OPTIONS \"([^\"]*)\"", cmake, re.S)
    avx512 = re.search(r"packed_gemm_avx512\.cpp[^)]*?APPEND PROPERTY COMPILE_OPTIONS \"([^\"]*)\"", cmake, re.S)
    bf16 = re.search(r"packed_gemm_bf16\.cpp[^)]*?APPEND PROPERTY COMPILE_OPTIONS \"([^\"]*)\"", cmake, re.S)
    if not (common and avx2 and avx512 and bf16):
        raise RuntimeError("CMakeLists.txt no longer sets the CPU kernels' flags the way cpu_kernel_flags reads them")
    return {name: m.group(1).split(";")
            for name, m in (("common", common), ("avx2", avx2), ("avx512", avx512), ("bf16", bf16))}


def cxx_compiler() -> str | None:
    """The C++ compiler host programs are built with (this one, tests/cpp): CXX, else c++, g++ or
    clang++; None if there is none."""
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def build(compiler: str, folder: Path) -> Path:
    """The cpu_floor program, linked with the library's AVX2 and AVX-512 builds of the packed GEMM
    (it times the one it is told to)."""
    flags = cpu_kernel_flags()
    base = [compiler, "-std=gnu++20", f"-I{ROOT / 'csrc'}"]
    objects = []
    for name in ("avx2", "avx512"):
        obj = folder / f"packed_gemm_{name}.o"
        source = ROOT / "csrc/engine/cpu" / f"packed_gemm_{name}.cpp"
        subprocess.run([*base, *flags["common"], *flags[name], "-c", str(source), "-o", str(obj)], check=True,
                       capture_output=True, text=True)
        objects.append(str(obj))
    program = folder / "cpu_floor"
    subprocess.run([*base, "-O2", "-pthread", "-o", str(program), str(ROOT / "benchmarks/cpu_floor.cpp"), *objects],
                   check=True, capture_output=True, text=True)
    return program


def measure(program: Path, kernels: str, threads: int, n: int, k: int, rows: int, form: str) -> dict:
    out = subprocess.run([str(program), kernels, str(threads), str(n), str(k), str(rows), form], check=True,
                         capture_output=True, text=True, timeout=600).stdout
    values = dict(re.findall(r"(\w+) ([\d.]+)", out))
    return {"us": float(values["us"]), "GBps": float(values["GBps"]), "GFLOPs": float(values["GFLOPs"])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256, help="H (= I) of the shapes (default 256)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="threads, each with its own share (default: the CPUs this process may use)")
    args = parser.parse_args(argv)
    if args.hidden < 1 or args.threads < 1:
        parser.error(f"--hidden and --threads must be positive, got {args.hidden} and {args.threads}")
    import rnnattn_ext.info  # the build of the CPU kernels that runs here

    kernels = rnnattn_ext.info.cpu_kernels()
    if kernels not in ("avx2", "avx512"):
        print(f"cpu_floor: the CPU kernels here are {kernels!r}; only the x86 AVX2 and AVX-512 builds are timed",
              file=sys.stderr)
        return 1
    compiler = cxx_compiler()
    if compiler is None:
        print("cpu_floor: no C++ compiler (CXX, c++, g++ or clang++)", file=sys.stderr)
        return 1
    H, threads = args.hidden, args.threads
    with tempfile.TemporaryDirectory() as folder:
        program = build(compiler, Path(folder))
        rows = []
        floors = []
        for cell, gates in GATES.items():
            n = max(1, gates * H // threads)
            case = {
                "step B=1": measure(program, kernels, threads, n, H, 1, "packed"),
                "stream B=1": measure(program, kernels, threads, 2 * n, H, 1, "in_place"),
                "step B=16": measure(program, kernels, threads, n, H, 16, "packed"),
                "GEMM 64": measure(program, kernels, threads, n, H, 64, "packed"),
            }
            for name, m in case.items():
                size = f"{2 * n}×{H}" if name == "stream B=1" else f"{n}×{H}"
                rows.append(f"| {cell} | {name} | {size} | {m['us']:.2f} | {m['GBps']:.1f} | {m['GFLOPs']:.1f} |")
            for batch, steps in SUITE_SHAPES:
                multiply_adds = steps * batch * gates * H * 2 * H  # (I + H) = 2H per gate row
                if batch == 1:
                    projection = steps * gates * H * H / (threads * case["GEMM 64"]["GFLOPs"] / 2 * 1e3)  # µs
                    forward = (steps * case["step B=1"]["us"] + projection) / 1e3
                else:
                    forward = multiply_adds / (threads * case["step B=16"]["GFLOPs"] / 2 * 1e6)
                # The backward: the forward's products again (dh_{t-1} step by step, dx in large products),
                # then the weight gradients (as many multiply-adds as the forward) in large products.
                backward = forward + multiply_adds / (threads * case["GEMM 64"]["GFLOPs"] / 2 * 1e6)
                floors.append(f"| {cell} | {batch}×{steps}×{H}×{H} | {forward:.3g} | {forward + backward:.3g} |")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_common import device_line, machine_info

    print(device_line(machine_info("cpu"), "cpu", "float32"))
    print(f"\n`python benchmarks/cpu_floor.py --hidden {H} --threads {threads}`: {threads} thread(s), each its own "
          f"share, CPU kernels {kernels}, H = I = {H}\n")
    print("| cell | case | weights per thread | µs per product | GB/s of weights per thread | GFLOP/s per thread |")
    print("|---|---|---|---:|---:|---:|")
    print("\n".join(rows))
    print("\nLeast times at these rates (ms):\n")
    print("| cell | B×T×I×H | forward | forward+backward |")
    print("|---|---|---:|---:|")
    print("\n".join(floors))
    return 0


if __name__ == "__main__":
    sys.exit(main())
