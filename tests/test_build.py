"""The import-time check of the torch version and what the compiled library reports."""

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
