"""The import-time check of the torch version and what the compiled library reports."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rnnattn_ext
from rnnattn_ext import _build_info, _loader, _ops


def test_built_against_the_running_torch():
    assert _build_info.TORCH_VERSION == torch.__version__
    assert _ops._C.built_with_torch == torch.__version__


def test_version_mismatch_names_both_versions_and_the_fix(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "9.9.9+other")
    with pytest.raises(ImportError) as info:
        _loader.load_extension()
    message = str(info.value)
    assert _build_info.TORCH_VERSION in message
    assert "9.9.9+other" in message
    assert "pip install --no-build-isolation" in message


def test_another_build_of_the_library_loads_in_place_of_the_installed_one(tmp_path):
    # RNNATTN_LIBRARY (scripts/cpu_sanitizer.sh): here a copy of the installed library, in a folder
    # of its own, which the ops and modules then run on.
    copy = tmp_path / Path(_ops._C.__file__).name
    shutil.copyfile(_ops._C.__file__, copy)
    code = ("import torch, rnnattn_ext; from rnnattn_ext import _ops; print(_ops._C.__file__); "
            "print(rnnattn_ext.LSTM(3, 4)(torch.randn(2, 1, 3))[0].shape)")
    env = {**os.environ, "RNNATTN_LIBRARY": str(copy)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == [str(copy), "torch.Size([2, 1, 4])"]
    env["RNNATTN_LIBRARY"] = str(tmp_path / "missing.so")
    result = subprocess.run([sys.executable, "-c", "import rnnattn_ext"], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0
    assert "RNNATTN_LIBRARY must name a built rnnattn_ext._C library file, got" in result.stderr


def test_cpu_sanitizer_script_parses_and_leaves_out_files_that_exist():
    # scripts/cpu_sanitizer.sh is run by hand (a second build): its syntax and the test files its
    # default set leaves out (pytest ignores an --ignore of a missing file) are checked here.
    script = Path(__file__).resolve().parent.parent / "scripts" / "cpu_sanitizer.sh"
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=60)
    ignored = re.findall(r"--ignore=(\S+)", script.read_text())
    assert "tests/test_resources.py" in ignored
    for name in ignored:
        assert (script.parent.parent / name).is_file(), name


def test_every_cell_has_forward_and_backward_ops():
    for cell in _ops.CELLS:
        assert hasattr(torch.ops.rnnattn, f"{cell}_forward")
        assert hasattr(torch.ops.rnnattn, f"{cell}_backward")
    assert set(_ops.CELL_LAYOUTS) == set(_ops.CELLS)


def test_cuda_build_matches_report():
    assert _build_info.CUDA_BUILT == _ops._C.cuda_built
    if torch.cuda.is_available() and torch.version.cuda:
        # A CUDA build of torch with a visible GPU: the kernels must be there (built with nvcc).
        assert _ops._C.cuda_built, "torch has CUDA but rnnattn_ext was built without its CUDA kernels"


def test_public_api():
    for name in ("LSTM", "GRU", "RNN", "functional", "reference"):
        assert hasattr(rnnattn_ext, name)
