"""The CPU GEMM's builds (csrc/engine/cpu/packed_gemm*) on the host, without torch: every build this
CPU runs against the sums it must compute, bit for bit for the packed product (one chain of
multiply-adds per element) and for the product by M's columns in place, within float rounding for the
in-place one by M's rows, nothing written outside the output (tests/cpp/packed_gemm_check.cpp). The AVX2 and AVX-512 builds are the library's own sources
compiled with the flags CMakeLists.txt gives them."""

import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import cxx_compiler

ROOT = Path(__file__).resolve().parents[1]
X86 = platform.machine().lower() in ("x86_64", "amd64")


def _kernel_flags():
    """The flags CMakeLists.txt compiles the kernels with: (common, AVX2 build's, AVX-512 build's)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from cpu_floor import cpu_kernel_flags  # read from CMakeLists.txt where the floor benchmark reads them too

    flags = cpu_kernel_flags(ROOT)
    return flags["common"], flags["avx2"], flags["avx512"], flags["bf16"]


# Built with AddressSanitizer and UndefinedBehaviorSanitizer too: a kernel that reads past a column
# of M (gemm_columns reads them in place, each in its own buffer in the check) or writes past its
# output aborts the run.
SANITIZERS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]


@pytest.mark.parametrize("sanitized", [False, True], ids=["plain", "sanitized"])
def test_gemm_builds_compute_their_sums(tmp_path, sanitized):
    compiler = cxx_compiler()
    if compiler is None:
        pytest.skip("no C++ compiler (CXX, c++, g++ or clang++) to build the host check with")
    if sanitized and not _compiler_takes(compiler, SANITIZERS, tmp_path, link=True):
        pytest.skip(f"{compiler} cannot build and link with {' '.join(SANITIZERS)}")
    common, avx2_flags, avx512_flags, _ = _kernel_flags()
    base = [compiler, "-std=gnu++20", f"-I{ROOT / 'csrc'}", *(SANITIZERS if sanitized else [])]
    objects, defines = [], []
    if X86:
        for name, flags in (("avx2", avx2_flags), ("avx512", avx512_flags)):
            obj = tmp_path / f"packed_gemm_{name}.o"
            build = subprocess.run([*base, *common, *flags, "-c", str(ROOT / "csrc/engine/cpu" / f"packed_gemm_{name}.cpp"),
                                    "-o", str(obj)], capture_output=True, text=True, timeout=600)
            assert build.returncode == 0, build.stderr
            objects.append(str(obj))
            defines.append(f"-DRNNATTN_CHECK_{name.upper()}")
    program = tmp_path / "packed_gemm_check"
    build = subprocess.run([*base, "-O2", "-ffp-contract=off", *defines, "-o", str(program),
                            str(ROOT / "tests/cpp/packed_gemm_check.cpp"), *objects],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(program)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    results = dict(re.findall(r"^(\w+): (\d+) cases, 0 mismatched$", run.stdout, re.M))
    assert "baseline" in results, run.stdout
    capability = torch.backends.cpu.get_cpu_capability()
    if X86 and capability in ("AVX2", "AVX512"):
        assert "avx2" in results, run.stdout
    if X86 and capability == "AVX512":  # torch's AVX512 level implies AVX-512F
        assert "avx512" in results, run.stdout
    assert all(int(count) > 2000 for count in results.values()), run.stdout


def _compiler_takes(compiler: str, flags: list[str], folder, link: bool = False) -> bool:
    """Whether the compiler compiles (and with link, links) an empty program with these flags."""
    probe = folder / "probe.cpp"
    probe.write_text("int main() { return 0; }\n")
    output = ["-o", str(folder / "probe")] if link else ["-c", "-o", str(folder / "probe.o")]
    return subprocess.run([compiler, *flags, str(probe), *output], capture_output=True).returncode == 0


@pytest.mark.parametrize("hardware", [False, True], ids=["portable", "avx512bf16"])
def test_bf16_gemm_computes_its_sums(tmp_path, hardware):
    """The bfloat16 GEMM bit for bit against its chains of exact products (tests/cpp/packed_gemm_bf16_check.cpp):
    its AVX512-BF16 kernel (the library's flags) and the portable loop of a build without them."""
    compiler = cxx_compiler()
    if compiler is None:
        pytest.skip("no C++ compiler (CXX, c++, g++ or clang++) to build the host check with")
    common, _, _, bf16_flags = _kernel_flags()
    if hardware and not (X86 and _compiler_takes(compiler, bf16_flags, tmp_path)):
        pytest.skip(f"{compiler} cannot build the AVX512-BF16 kernel here (not x86, or no -mavx512bf16)")
    base = [compiler, "-std=gnu++20", f"-I{ROOT / 'csrc'}"]
    obj = tmp_path / "packed_gemm_bf16.o"
    build = subprocess.run([*base, *common, *(bf16_flags if hardware else []), "-c",
                            str(ROOT / "csrc/engine/cpu/packed_gemm_bf16.cpp"), "-o", str(obj)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    program = tmp_path / "packed_gemm_bf16_check"
    build = subprocess.run([*base, "-O2", "-ffp-contract=off", *(["-DRNNATTN_CHECK_HARDWARE"] if hardware else []),
                            "-o", str(program), str(ROOT / "tests/cpp/packed_gemm_bf16_check.cpp"), str(obj)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(program)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    if "not run (no AVX512-BF16)" in run.stdout:
        pytest.skip("this CPU has no AVX512-BF16 to run the bfloat16 kernel on")
    assert re.search(rf"^bf16 {'avx512' if hardware else 'portable'}: (\d{{4,}}) cases, 0 mismatched$", run.stdout, re.M), \
        run.stdout
