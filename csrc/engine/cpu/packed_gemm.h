// A small float GEMM for the per-step products of the CPU time loop: out = a @ M^T (+ bias), with M
// packed once per call into panels of 16 columns, so that every step streams the weights in the
// order the register-blocked kernel reads them and nothing is re-packed per step (MKL re-packs its
// operands on every call, which dominates at the small batch sizes of a recurrent step).
// Torch-free; compiled per instruction set like the pointwise loops, and for AVX-512 too.
#pragma once
#include <cstdint>

namespace rnnattn::cpu {

constexpr int64_t kPanelWidth = 16;

struct PackedMatrix {
  int64_t n = 0;  // columns of the product (rows of M)
  int64_t k = 0;  // reduction length
  float* panels = nullptr;  // [ceil(n / 16)][k][16], zero-padded past n; owned by the caller

  static int64_t floats_needed(int64_t n, int64_t k) { return (n + kPanelWidth - 1) / kPanelWidth * k * kPanelWidth; }
};

// Packs M (n x k), whose element (i, j) is at rows[i][j * stride_k], into `storage`
// (PackedMatrix::floats_needed(n, k) floats). A table of row addresses lets M's rows be a permutation
// of one tensor's rows or come from several tensors (the attention cell's W_hh, W_q, W_k, W_v).
PackedMatrix pack_matrix(const float* const* rows, int64_t n, int64_t k, int64_t stride_k, float* storage);

using PackedGemmFn = void (*)(const float* a, int64_t rows, int64_t lda, const PackedMatrix& m, const float* bias,
                              float* out, int64_t ldo);

// M (n x k) read in place: row i contiguous at rows[i]. For a product used once at a few rows (a
// single step), where packing M would cost more than the product itself.
struct RowsMatrix {
  const float* const* rows = nullptr;
  int64_t n = 0, k = 0;
};

// The most rows of `a` that gemm_rows is meant for: it reads M once per pair of rows.
constexpr int64_t kRowsGemmMaxRows = 4;

using RowsGemmFn = void (*)(const float* a, int64_t rows, int64_t lda, const RowsMatrix& m, const float* bias,
                            float* out, int64_t ldo);

#define RNNATTN_DECLARE_CPU_GEMM(ns)                                                                      \
  namespace ns {                                                                                          \
  /* out[r][c] = bias[c] + sum_j a[r * lda + j] * M[c][j] for r < rows, c < m.n (bias may be null). */   \
  void gemm_packed(const float* a, int64_t rows, int64_t lda, const PackedMatrix& m, const float* bias,  \
                   float* out, int64_t ldo);                                                              \
  PackedMatrix pack_matrix(const float* const* rows, int64_t n, int64_t k, int64_t stride_k, float* storage); \
  /* The same product with M read in place (RowsMatrix). */                                              \
  void gemm_rows(const float* a, int64_t rows, int64_t lda, const RowsMatrix& m, const float* bias,      \
                 float* out, int64_t ldo);                                                                \
  }
RNNATTN_DECLARE_CPU_GEMM(baseline)
RNNATTN_DECLARE_CPU_GEMM(avx2)
RNNATTN_DECLARE_CPU_GEMM(avx512)
#undef RNNATTN_DECLARE_CPU_GEMM

PackedGemmFn gemm_packed_fn();
RowsGemmFn gemm_rows_fn();

}  // namespace rnnattn::cpu
