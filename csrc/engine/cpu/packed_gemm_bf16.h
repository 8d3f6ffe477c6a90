// The packed GEMM of packed_gemm.h with bfloat16 operands and float32 sums, for CPUs with AVX512-BF16
// (AMD Zen 4, Intel Cooper Lake and Sapphire Rapids on): one instruction multiplies 16 pairs of
// bfloat16 and adds both products to 16 float sums, twice the multiply-adds of a float FMA. The
// engine runs a bfloat16 layer's products on it (the weights are bfloat16 already; each product's
// left operand, x or h_{t-1}, is rounded to bfloat16 first, as torch.nn's bfloat16 layers hold h);
// everything else of the layer stays float32. Torch-free.
#pragma once
#include <cstdint>

#include "engine/cpu/packed_gemm.h"

namespace rnnattn::cpu {

// M (n x k) as bfloat16 pairs: panels of 16 columns, [ceil(n / 16)][ceil(k / 2)][16] 32-bit words,
// word (p, j, c) = M[16p + c][2j] in its low half and M[16p + c][2j + 1] in its high half, zero past
// n and k. Owned by the caller.
struct PackedBf16Matrix {
  int64_t n = 0, k = 0;
  uint32_t* panels = nullptr;

  static int64_t pairs(int64_t k) { return (k + 1) / 2; }
  static int64_t words_needed(int64_t n, int64_t k) { return panel_count(n) * pairs(k) * kPanelWidth; }
};

// The bfloat16 nearest to x (ties to even); NaN stays NaN.
inline uint16_t to_bfloat16(float x) {
  uint32_t bits;
  __builtin_memcpy(&bits, &x, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// Whether this process runs bfloat16 products: the CPU has AVX512-BF16 and the AVX-512 build of the
// kernels is chosen (kernel_isa.h; RNNATTN_CPU_KERNELS=avx2 or baseline turns them off too).
bool bf16_products_available();

// Packs M, whose element (i, j) is at rows[i][j * stride_k], each rounded to bfloat16 (exact for a
// weight that was bfloat16), into `storage` (PackedBf16Matrix::words_needed(n, k) words). Here and in
// pack_columns_bf16 the AVX512-BF16 build rounds with the hardware's conversion, which also flushes
// float denormals to zero: the product instruction reads denormal bfloat16 as zero all the same.
PackedBf16Matrix pack_matrix_bf16(const float* const* rows, int64_t n, int64_t k, int64_t stride_k,
                                  uint32_t* storage);

// Packs the panels [panel_begin, panel_end) of M (n x k) whose column j is the n floats at columns[j]
// (M^T's rows, as pack_columns of packed_gemm.h), each rounded to bfloat16: the backward's products
// by a transposed matrix (dh = dg W_hh, dx = dg W_ih, dW = dg^T x). Members of a team can each pack
// their own panels of one matrix.
PackedBf16Matrix pack_columns_bf16(const float* const* columns, int64_t n, int64_t k, uint32_t* storage,
                                   int64_t panel_begin, int64_t panel_end);

// out[r][c] = bias[c] + sum_j bf16(a[r * lda + j]) * M[c][j] for r < rows, c < m.n (bias may be null;
// with accumulate the sum starts from out[r][c] too), the products and sums in float32. Only where
// bf16_products_available().
void gemm_packed_bf16(const float* a, int64_t rows, int64_t lda, const PackedBf16Matrix& m, const float* bias,
                      float* out, int64_t ldo, bool accumulate);

}  // namespace rnnattn::cpu
