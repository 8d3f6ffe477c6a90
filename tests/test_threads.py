"""Results must not depend on the number of CPU threads (GEMM and pointwise parallelism)."""

import pytest
import torch

from rnnattn_ext import functional, reference

from helpers import CELLS, assert_close, grads, layer_args


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


TOLERANCES = {torch.float64: (1e-10, 1e-9), torch.float32: (2e-5, 1e-4)}


# float32 on the CPU runs the packed GEMM kernel, float64 goes through ATen: both are covered.
# Batch 13 exercises full and partial row blocks of the kernel, hidden 100 partial column panels.
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("cell", CELLS)
def test_any_number_of_threads(cell, threads, dtype, restore_threads):
    torch.set_num_threads(threads)
    atol, rtol = TOLERANCES[dtype]
    gen = torch.Generator().manual_seed(20)
    x, states, w_ih, w_hh, b_ih, b_hh = layer_args(cell, 6, 13, 7, 100, dtype, generator=gen)
    inputs = [x, *states, w_ih, w_hh, b_ih, b_hh]
    for reverse in (False, True):
        out, finals = functional.layer(cell, x, states, w_ih, w_hh, b_ih, b_hh, reverse=reverse)
        ref_out, ref_finals = reference.layer(cell, x, states, w_ih, w_hh, b_ih, b_hh, reverse=reverse)
        assert_close(out, ref_out, atol, rtol, "output")
        for f, rf in zip(finals, ref_finals):
            assert_close(f, rf, atol, rtol, "final state")
        weight = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(dtype)
        loss = (out * weight).sum() + sum(f.sum() for f in finals)
        ref_loss = (ref_out * weight).sum() + sum(f.sum() for f in ref_finals)
        for a, b in zip(grads(loss, inputs), grads(ref_loss, inputs)):
            assert_close(a, b, atol * 10, rtol * 10, "gradient")
