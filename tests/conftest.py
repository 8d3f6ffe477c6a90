import pytest
import torch

import rnnattn_ext  # noqa: F401  (registers the ops)

CUDA_AVAILABLE = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU: none is visible (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords and not CUDA_AVAILABLE:
            item.add_marker(skip)


def device_params():
    """CPU always; CUDA as a param carrying the `cuda` marker."""
    return ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
