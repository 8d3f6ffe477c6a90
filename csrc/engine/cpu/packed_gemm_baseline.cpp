// The packed GEMM for any CPU, and what both instruction sets share.
#define RNNATTN_CPU_ISA baseline
#include "engine/cpu/packed_gemm_impl.h"

#include "engine/cpu/pointwise_cpu.h"

namespace rnnattn::cpu {

void pack_matrix(const float* m, int64_t n, int64_t k, int64_t stride_n, int64_t stride_k, PackedMatrix& out) {
  const int64_t panels = (n + kPanelWidth - 1) / kPanelWidth;
  out.n = n;
  out.k = k;
  out.panels.assign(panels * k * kPanelWidth, 0.f);
  for (int64_t p = 0; p < panels; ++p) {
    float* panel = out.panels.data() + p * k * kPanelWidth;
    const int64_t width = std::min<int64_t>(kPanelWidth, n - p * kPanelWidth);
    for (int64_t j = 0; j < k; ++j) {
      for (int64_t i = 0; i < width; ++i) panel[j * kPanelWidth + i] = m[(p * kPanelWidth + i) * stride_n + j * stride_k];
    }
  }
}

PackedGemmFn gemm_packed_fn() {
  static const PackedGemmFn fn = has_avx2_fma() ? &avx2::gemm_packed : &baseline::gemm_packed;
  return fn;
}

}  // namespace rnnattn::cpu
