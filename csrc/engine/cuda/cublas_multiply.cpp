#include "engine/cuda/cublas_multiply.h"

#include <ATen/cuda/CUDAContextLight.h>
#include <c10/util/Exception.h>
#include <cublas_v2.h>

#include <climits>

namespace rnnattn::cuda {

void multiply_nt(at::ScalarType dtype, int64_t rows, int64_t n, int64_t k, const void* a, int64_t lda, const void* m,
                 int64_t ldm, bool m_by_rows, bool accumulate, void* out, int64_t ld_out) {
  for (const int64_t v : {rows, n, k, lda, ldm, ld_out}) {
    TORCH_CHECK(v <= INT_MAX, "rnnattn: a per-step product is too large for cuBLAS (a dimension of ", v, ")");
  }
  cudaDataType_t type = CUDA_R_32F;
  cublasComputeType_t compute = CUBLAS_COMPUTE_32F;
  switch (dtype) {
    case at::kFloat: break;
    case at::kDouble: type = CUDA_R_64F; compute = CUBLAS_COMPUTE_64F; break;
    case at::kHalf: type = CUDA_R_16F; break;
    case at::kBFloat16: type = CUDA_R_16BF; break;
    default: TORCH_CHECK_TYPE(false, "rnnattn: no cuBLAS product for dtype ", dtype);
  }
  // alpha and beta in the compute type.
  const double alpha64 = 1.0, beta64 = accumulate ? 1.0 : 0.0;
  const float alpha32 = 1.0f, beta32 = accumulate ? 1.0f : 0.0f;
  const bool wide = compute == CUBLAS_COMPUTE_64F;
  const void* alpha = wide ? static_cast<const void*>(&alpha64) : &alpha32;
  const void* beta = wide ? static_cast<const void*>(&beta64) : &beta32;
  // cuBLAS is column-major: it computes out^T (n x rows) = M (n x k) @ a^T (k x rows), where a's rows
  // are a^T's columns, and M's rows, read column-major, are the k x n matrix M^T (hence OP_T).
  const cublasStatus_t status =
      cublasGemmEx(at::cuda::getCurrentCUDABlasHandle(), m_by_rows ? CUBLAS_OP_T : CUBLAS_OP_N, CUBLAS_OP_N,
                   static_cast<int>(n), static_cast<int>(rows), static_cast<int>(k), alpha, m, type,
                   static_cast<int>(ldm), a, type, static_cast<int>(lda), beta, out, type, static_cast<int>(ld_out),
                   compute, CUBLAS_GEMM_DEFAULT);
  TORCH_CHECK(status == CUBLAS_STATUS_SUCCESS, "rnnattn: cuBLAS product failed: ", cublasGetStatusString(status));
}

}  // namespace rnnattn::cuda
