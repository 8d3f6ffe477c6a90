import os

import pytest
import torch

# Small layers get one CPU block per thread, as large ones do by default, so that the tests' small
# sizes run the multi-block paths (the library's default keeps small layers on fewer blocks: see
# min_block_work in csrc/engine/unit_blocks.cpp; test_threads.py checks the default too).
os.environ.setdefault("RNNATTN_CPU_MIN_BLOCK_WORK", "1")
# And as many threads as a test asks for, more than the machine's CPUs included (3 on a 2-CPU
# machine: uneven splits); the library's default keeps to the CPUs it can use (test_threads.py).
os.environ.setdefault("RNNATTN_CPU_MAX_THREADS", "64")

import rnnattn_ext  # noqa: E402,F401  (registers the ops)

CUDA_AVAILABLE = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU: none is visible (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords and not CUDA_AVAILABLE:
            item.add_marker(skip)


def device_params():
    """CPU always; CUDA as a param carrying the `cuda` marker."""
    return ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
