// The packed GEMM for any CPU, and what both instruction sets share.
#define RNNATTN_CPU_ISA baseline
#include "engine/cpu/packed_gemm_impl.h"

#include "engine/cpu/pointwise_cpu.h"

namespace rnnattn::cpu {

PackedMatrix pack_matrix(const float* m, int64_t n, int64_t k, int64_t stride_n, int64_t stride_k, float* storage) {
  PackedMatrix out;
  out.n = n;
  out.k = k;
  out.panels = storage;
  const int64_t panels = (n + kPanelWidth - 1) / kPanelWidth;
  for (int64_t p = 0; p < panels; ++p) {
    float* panel = storage + p * k * kPanelWidth;
    const int64_t width = std::min<int64_t>(kPanelWidth, n - p * kPanelWidth);
    if (width < kPanelWidth) std::fill(panel, panel + k * kPanelWidth, 0.f);
    const float* first_row = m + p * kPanelWidth * stride_n;
    if (stride_n == 1) {
      // M^T stored row-major (a transposed view): a panel row is contiguous in memory.
      for (int64_t j = 0; j < k; ++j) {
        for (int64_t i = 0; i < width; ++i) panel[j * kPanelWidth + i] = first_row[j * stride_k + i];
      }
    } else {
      // Row by row, reading along each row of M.
      for (int64_t i = 0; i < width; ++i) {
        const float* row = first_row + i * stride_n;
        for (int64_t j = 0; j < k; ++j) panel[j * kPanelWidth + i] = row[j * stride_k];
      }
    }
  }
  return out;
}

PackedGemmFn gemm_packed_fn() {
  static const PackedGemmFn fn = has_avx2_fma() ? &avx2::gemm_packed : &baseline::gemm_packed;
  return fn;
}

}  // namespace rnnattn::cpu
