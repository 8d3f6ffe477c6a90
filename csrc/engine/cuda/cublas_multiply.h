// The time loop's per-step products on CUDA as direct cuBLAS calls. Each is a few microseconds of
// GPU work; through ATen (at::addmm_out) the host spends more than that per call on dispatch, checks
// and views, and the loop becomes bound by the host. Compiled with the host compiler (it includes
// ATen's cuBLAS handle, not the kernels' headers).
#pragma once
#include <cstdint>

#include <ATen/core/Tensor.h>

namespace rnnattn::cuda {

// out (rows x n, leading dimension ld_out) = a (rows x k, lda) @ M^T, or += with accumulate. M (n x k)
// is read either by rows (m_by_rows: row i at m + i * ldm, contiguous) or by columns (column j at
// m + j * ldm, contiguous: M^T stored row-major). dtype is out's (float, double, half or bfloat16;
// accumulated in float or double; float is never rounded through TF32, whatever torch's matmul
// setting). On the current stream of the current device, with torch's cuBLAS handle for it; the
// pointers are device memory of that dtype.
void multiply_nt(at::ScalarType dtype, int64_t rows, int64_t n, int64_t k, const void* a, int64_t lda, const void* m,
                 int64_t ldm, bool m_by_rows, bool accumulate, void* out, int64_t ld_out);

}  // namespace rnnattn::cuda
