"""The C++ sources compile against the oldest torch that pyproject.toml accepts, not only against the
installed one: torch's C++ API changes between releases (its autograd nodes went from std::shared_ptr
to c10::intrusive_ptr in 2.13), and a user with the oldest accepted torch builds from source.

The oldest wheel is fetched with pip (its cache serves later runs) and only its headers are read: each
CPU source is compiled with -fsyntax-only against them, with the build's include order and defines.
The CUDA sources need CUDA's headers besides, which that wheel does not carry."""

import os
import re
import subprocess
import sys
import sysconfig
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pybind11

ROOT = Path(__file__).resolve().parents[1]


def _oldest_torch() -> str:
    pyproject = (ROOT / "pyproject.toml").read_text()
    found = re.search(r'"torch>=([0-9][0-9.]*)', pyproject)
    assert found, "pyproject.toml names no minimum torch (torch>=X)"
    return found.group(1)


def _cpu_sources() -> list[Path]:
    cmake = (ROOT / "CMakeLists.txt").read_text()
    found = re.search(r"set\(CPU_SOURCES\s+(.*?)\)", cmake, re.S)
    assert found, "CMakeLists.txt has no CPU_SOURCES list"
    return [ROOT / name for name in found.group(1).split()]


def _torch_headers(version: str, workdir: Path) -> Path:
    """The include directory of torch==version's wheel for this platform."""
    wheels = workdir / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--dest", str(wheels), f"torch=={version}"], check=True, timeout=1200)
    (wheel,) = wheels.glob("torch-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(workdir, [n for n in archive.namelist() if n.startswith("torch/include/")])
    return workdir / "torch" / "include"


def test_sources_compile_against_the_oldest_accepted_torch(tmp_path):
    version = _oldest_torch()
    include = _torch_headers(version, tmp_path)
    compiler = os.environ.get("CXX", "c++")
    flags = ["-std=gnu++20", "-fsyntax-only", "-fopenmp", "-D_GLIBCXX_USE_CXX11_ABI=1",
             f'-DRNNATTN_TORCH_VERSION="{version}"', f"-I{ROOT / 'csrc'}",
             # torch's own pybind11 first, as cmake/TorchFromPython.cmake orders them
             "-isystem", str(include), "-isystem", str(include / "torch" / "csrc" / "api" / "include"),
             "-isystem", sysconfig.get_paths()["include"], "-isystem", pybind11.get_include()]
    if os.uname().machine in ("x86_64", "AMD64"):
        flags += ["-mavx2", "-mfma", "-mavx512f"]  # the AVX kernels' own flags; harmless for the others

    def compile_one(source: Path):
        result = subprocess.run([compiler, *flags, str(source)], capture_output=True, text=True, timeout=600)
        return source, result

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = list(pool.map(compile_one, _cpu_sources()))
    failures = [f"{source.relative_to(ROOT)}:\n{result.stderr[-3000:]}" for source, result in results
                if result.returncode != 0]
    assert not failures, f"against torch {version}'s headers:\n" + "\n".join(failures)
