// The register-blocked kernel of packed_gemm.h, written with GCC vector extensions so that one source
// compiles to AVX2+FMA (8-float registers) and to baseline SSE2 (pairs of 4-float registers).
// Included by one .cpp per instruction set, which defines RNNATTN_CPU_ISA.
#pragma once
#include <algorithm>
#include <cstring>

#include "engine/cpu/packed_gemm.h"

namespace rnnattn::cpu::RNNATTN_CPU_ISA {
namespace {

typedef float vec8 __attribute__((vector_size(32)));

inline __attribute__((always_inline)) vec8 load8(const float* p) {
  vec8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline __attribute__((always_inline)) void store8(float* p, vec8 v) { std::memcpy(p, &v, sizeof(v)); }

// kRows rows of a times one 16-wide panel: 2 * kRows accumulators live in registers across k.
template <int kRows>
void panel_kernel(const float* a, int64_t lda, const float* panel, int64_t k, const float* bias, float* out,
                  int64_t ldo, int64_t width) {
  vec8 acc[kRows][2];
  vec8 b0 = {0, 0, 0, 0, 0, 0, 0, 0}, b1 = b0;
  if (bias != nullptr) {
    float padded[kPanelWidth] = {};
    std::memcpy(padded, bias, width * sizeof(float));
    b0 = load8(padded);
    b1 = load8(padded + 8);
  }
  for (int r = 0; r < kRows; ++r) {
    acc[r][0] = b0;
    acc[r][1] = b1;
  }
  for (int64_t j = 0; j < k; ++j) {
    const vec8 w0 = load8(panel + j * kPanelWidth);
    const vec8 w1 = load8(panel + j * kPanelWidth + 8);
    for (int r = 0; r < kRows; ++r) {
      const float s = a[r * lda + j];
      const vec8 x = {s, s, s, s, s, s, s, s};
      acc[r][0] += x * w0;
      acc[r][1] += x * w1;
    }
  }
  for (int r = 0; r < kRows; ++r) {
    if (width == kPanelWidth) {
      store8(out + r * ldo, acc[r][0]);
      store8(out + r * ldo + 8, acc[r][1]);
    } else {
      float tmp[kPanelWidth];
      store8(tmp, acc[r][0]);
      store8(tmp + 8, acc[r][1]);
      std::memcpy(out + r * ldo, tmp, width * sizeof(float));
    }
  }
}

// At most 6 rows per block: 12 accumulators + 2 weight vectors + 1 broadcast fit 16 AVX registers.
constexpr int kMaxRows = 6;

void row_block(int rows, const float* a, int64_t lda, const float* panel, int64_t k, const float* bias, float* out,
               int64_t ldo, int64_t width) {
  switch (rows) {
    case 1: return panel_kernel<1>(a, lda, panel, k, bias, out, ldo, width);
    case 2: return panel_kernel<2>(a, lda, panel, k, bias, out, ldo, width);
    case 3: return panel_kernel<3>(a, lda, panel, k, bias, out, ldo, width);
    case 4: return panel_kernel<4>(a, lda, panel, k, bias, out, ldo, width);
    case 5: return panel_kernel<5>(a, lda, panel, k, bias, out, ldo, width);
    default: return panel_kernel<6>(a, lda, panel, k, bias, out, ldo, width);
  }
}

}  // namespace

void gemm_packed(const float* a, int64_t rows, int64_t lda, const PackedMatrix& m, const float* bias, float* out,
                 int64_t ldo) {
  const int64_t panels = (m.n + kPanelWidth - 1) / kPanelWidth;
  // Panels outside, rows inside: a panel (k * 64 bytes) stays in L1 while every row block uses it.
  for (int64_t p = 0; p < panels; ++p) {
    const int64_t col = p * kPanelWidth;
    const int64_t width = std::min<int64_t>(kPanelWidth, m.n - col);
    const float* panel = m.panels.data() + p * m.k * kPanelWidth;
    for (int64_t r = 0; r < rows; r += kMaxRows) {
      const int block = static_cast<int>(std::min<int64_t>(kMaxRows, rows - r));
      row_block(block, a + r * lda, lda, panel, m.k, bias ? bias + col : nullptr, out + r * ldo + col, ldo, width);
    }
  }
}

}  // namespace rnnattn::cpu::RNNATTN_CPU_ISA
