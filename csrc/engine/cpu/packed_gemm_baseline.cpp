// The packed GEMM for any CPU, and the run-time choice between its builds.
#define RNNATTN_CPU_ISA baseline
#include "engine/cpu/packed_gemm_impl.h"

#include "engine/cpu/kernel_isa.h"

namespace rnnattn::cpu {

// The AVX-512 choice packs and reads M in place with the AVX2 build: packing is moves, and the
// in-place product (a few rows) is bound by reading M, which 32-byte loads did faster; its sums also
// stay bitwise those of the AVX2 build (GCC's AVX-512 code for their tails rounded differently).
PackedMatrix pack_matrix(const float* const* rows, int64_t n, int64_t k, int64_t stride_k, float* storage) {
  return has_avx2_fma() ? avx2::pack_matrix(rows, n, k, stride_k, storage)
                        : baseline::pack_matrix(rows, n, k, stride_k, storage);
}

PackedMatrix pack_columns(const float* const* columns, int64_t n, int64_t k, float* storage, int64_t panel_begin,
                          int64_t panel_end) {
  return (has_avx2_fma() ? &avx2::pack_columns : &baseline::pack_columns)(columns, n, k, storage, panel_begin,
                                                                          panel_end);
}

void transpose(const float* src, int64_t rows, int64_t cols, int64_t ld_src, float* dst, int64_t ld_dst) {
  (has_avx2_fma() ? &avx2::transpose : &baseline::transpose)(src, rows, cols, ld_src, dst, ld_dst);
}

void add_row_sums(const float* a, int64_t rows, int64_t cols, int64_t lda, float* sums) {
  (has_avx2_fma() ? &avx2::add_row_sums : &baseline::add_row_sums)(a, rows, cols, lda, sums);
}

RowsGemmFn gemm_rows_fn() {
  static const RowsGemmFn fn = has_avx2_fma() ? &avx2::gemm_rows : &baseline::gemm_rows;
  return fn;
}

Rows16GemmFn gemm_rows_16_fn() {
  static const Rows16GemmFn fn = has_avx2_fma() ? &avx2::gemm_rows_16 : &baseline::gemm_rows_16;
  return fn;
}

PackedGemmFn gemm_packed_fn() {
  static const PackedGemmFn fn = kernel_isa() == KernelIsa::avx512 ? &avx512::gemm_packed
                                 : kernel_isa() == KernelIsa::avx2 ? &avx2::gemm_packed
                                                                   : &baseline::gemm_packed;
  return fn;
}

ColumnsGemmFn gemm_columns_fn() {
  static const ColumnsGemmFn fn = kernel_isa() == KernelIsa::avx512 ? &avx512::gemm_columns
                                  : kernel_isa() == KernelIsa::avx2 ? &avx2::gemm_columns
                                                                    : &baseline::gemm_columns;
  return fn;
}

}  // namespace rnnattn::cpu
