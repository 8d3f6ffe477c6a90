// The packed GEMM for any CPU, and what both instruction sets share.
#define RNNATTN_CPU_ISA baseline
#include "engine/cpu/packed_gemm_impl.h"

#include "engine/cpu/pointwise_cpu.h"

namespace rnnattn::cpu {

PackedMatrix pack_matrix(const float* const* rows, int64_t n, int64_t k, int64_t stride_k, float* storage) {
  return has_avx2_fma() ? avx2::pack_matrix(rows, n, k, stride_k, storage)
                        : baseline::pack_matrix(rows, n, k, stride_k, storage);
}

RowsGemmFn gemm_rows_fn() {
  static const RowsGemmFn fn = has_avx2_fma() ? &avx2::gemm_rows : &baseline::gemm_rows;
  return fn;
}

PackedGemmFn gemm_packed_fn() {
  static const PackedGemmFn fn = has_avx2_fma() ? &avx2::gemm_packed : &baseline::gemm_packed;
  return fn;
}

}  // namespace rnnattn::cpu
