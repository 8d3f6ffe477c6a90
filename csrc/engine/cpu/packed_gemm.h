// A small float GEMM for the per-step products of the CPU time loop: out = a @ M^T (+ bias), with M
// packed once per call into panels of 16 columns, so that every step streams the weights in the
// order the register-blocked kernel reads them and nothing is re-packed per step (MKL re-packs its
// operands on every call, which dominates at the small batch sizes of a recurrent step). The
// backward's large products of a chunk of steps run in it too (pack_columns, transpose,
// add_row_sums), at a higher rate than MKL's on the CPUs measured.
// Torch-free; compiled per instruction set like the pointwise loops, and for AVX-512 too.
#pragma once
#include <cstdint>

namespace rnnattn::cpu {

constexpr int64_t kPanelWidth = 16;
inline int64_t panel_count(int64_t n) { return (n + kPanelWidth - 1) / kPanelWidth; }

struct PackedMatrix {
  int64_t n = 0;  // columns of the product (rows of M)
  int64_t k = 0;  // reduction length
  float* panels = nullptr;  // [ceil(n / 16)][k][16], zero-padded past n; owned by the caller

  static int64_t floats_needed(int64_t n, int64_t k) { return panel_count(n) * k * kPanelWidth; }
};

// Packs M (n x k), whose element (i, j) is at rows[i][j * stride_k], into `storage`
// (PackedMatrix::floats_needed(n, k) floats). A table of row addresses lets M's rows be a permutation
// of one tensor's rows or come from several tensors (the attention cell's W_hh, W_q, W_k, W_v).
PackedMatrix pack_matrix(const float* const* rows, int64_t n, int64_t k, int64_t stride_k, float* storage);

// Packs the panels [panel_begin, panel_end) of M (n x k) whose column j is the n floats at columns[j]:
// M^T's rows, as in a product by the transpose of a row-major matrix (the backward's dx = dg W_ih,
// dW = dg^T x). Members of a team can each pack their own panels of one matrix.
PackedMatrix pack_columns(const float* const* columns, int64_t n, int64_t k, float* storage, int64_t panel_begin,
                          int64_t panel_end);

// Rows of a product's a this many floats (4 KiB) apart, or a multiple of it, map to the same L1 sets,
// and a block of more rows than the cache has ways evicts its own rows (12-row blocks at k = 1024: 101
// GFLOP/s against 114 at k = 1040). A row stride of at least k floats that avoids it: k, or 16
// floats more if k is such a multiple (a buffer whose rows a product reads in place).
constexpr int64_t kSetAliasFloats = 1024;
inline int64_t alias_free_stride(int64_t k) { return k % kSetAliasFloats == 0 ? k + kPanelWidth : k; }
// The same for a copy of rows of k floats: whole panels and 16 floats more.
inline int64_t spaced_stride(int64_t k) { return alias_free_stride(panel_count(k) * kPanelWidth + kPanelWidth); }

// dst = src^T: src is rows x cols (row stride ld_src), dst cols x rows (row stride ld_dst).
void transpose(const float* src, int64_t rows, int64_t cols, int64_t ld_src, float* dst, int64_t ld_dst);

// sums[r] += the sum of row r of a (rows x cols, row stride lda): a bias gradient from transposed
// gate gradients.
void add_row_sums(const float* a, int64_t rows, int64_t cols, int64_t lda, float* sums);

using PackedGemmFn = void (*)(const float* a, int64_t rows, int64_t lda, const PackedMatrix& m, const float* bias,
                              float* out, int64_t ldo, bool accumulate);

// M (n x k) read in place: row i contiguous at rows[i]. For a product used once at a few rows (a
// single step), where packing M would cost more than the product itself.
struct RowsMatrix {
  const float* const* rows = nullptr;
  int64_t n = 0, k = 0;
  // At one row of a, M's rows read last first (the same sums): see gemm_rows_of.
  bool last_first = false;
};

// M read in place in a 16-bit float format (a bfloat16 or float16 layer's weights in a one-step
// call): the bits of row i's k values at rows[i]. gemm_rows_16 widens each to float, exactly, so its
// sums are bit for bit gemm_rows' on M's float copy, without making that copy.
enum class Float16Kind { bfloat16, float16 };
struct Rows16Matrix {
  const uint16_t* const* rows = nullptr;
  int64_t n = 0, k = 0;
  Float16Kind kind = Float16Kind::bfloat16;
  bool last_first = false;  // as RowsMatrix's
};

// M (n x k) by its columns where they are: column j (n floats, contiguous) at columns[j], M^T's rows,
// as in the backward's products by a row-major matrix (dx = dg W_ih: M = W_ih^T, whose columns are
// W_ih's rows; dW = dg^T x: M = x^T). For a product that reads M once or a few times (a short
// call's backward), where packing all of M first cost as much as the products: gemm_columns reads
// the columns in place for a product of one block of rows (at most 12 with AVX-512, 6 otherwise),
// and for more packs one group of panels at a time into a buffer that stays in cache while every
// block reads it. Its sums are bit for bit gemm_packed's on pack_columns of the same columns.
struct ColumnsMatrix {
  const float* const* columns = nullptr;
  int64_t n = 0, k = 0;
};
using ColumnsGemmFn = void (*)(const float* a, int64_t rows, int64_t lda, const ColumnsMatrix& m, const float* bias,
                               float* out, int64_t ldo, bool accumulate);

// The most rows of `a` that gemm_rows is meant for: it reads M once per pair of rows.
constexpr int64_t kRowsGemmMaxRows = 4;

using RowsGemmFn = void (*)(const float* a, int64_t rows, int64_t lda, const RowsMatrix& m, const float* bias,
                            float* out, int64_t ldo);
using Rows16GemmFn = void (*)(const float* a, int64_t rows, int64_t lda, const Rows16Matrix& m, const float* bias,
                              float* out, int64_t ldo);

#define RNNATTN_DECLARE_CPU_GEMM(ns)                                                                      \
  namespace ns {                                                                                          \
  /* out[r][c] = bias[c] + sum_j a[r * lda + j] * M[c][j] for r < rows, c < m.n (bias may be null); */  \
  /* with accumulate the sum starts from out[r][c] (+ bias[c]) instead. */                                \
  void gemm_packed(const float* a, int64_t rows, int64_t lda, const PackedMatrix& m, const float* bias,  \
                   float* out, int64_t ldo, bool accumulate);                                             \
  /* The same product with M read in place by columns (ColumnsMatrix). */                                \
  void gemm_columns(const float* a, int64_t rows, int64_t lda, const ColumnsMatrix& m, const float* bias, \
                    float* out, int64_t ldo, bool accumulate);                                            \
  PackedMatrix pack_matrix(const float* const* rows, int64_t n, int64_t k, int64_t stride_k, float* storage); \
  PackedMatrix pack_columns(const float* const* columns, int64_t n, int64_t k, float* storage,            \
                            int64_t panel_begin, int64_t panel_end);                                      \
  void transpose(const float* src, int64_t rows, int64_t cols, int64_t ld_src, float* dst, int64_t ld_dst); \
  void add_row_sums(const float* a, int64_t rows, int64_t cols, int64_t lda, float* sums);                 \
  /* The same product with M read in place (RowsMatrix). */                                              \
  void gemm_rows(const float* a, int64_t rows, int64_t lda, const RowsMatrix& m, const float* bias,      \
                 float* out, int64_t ldo);                                                                \
  void gemm_rows_16(const float* a, int64_t rows, int64_t lda, const Rows16Matrix& m, const float* bias,  \
                    float* out, int64_t ldo);                                                             \
  }
RNNATTN_DECLARE_CPU_GEMM(baseline)
RNNATTN_DECLARE_CPU_GEMM(avx2)
RNNATTN_DECLARE_CPU_GEMM(avx512)
#undef RNNATTN_DECLARE_CPU_GEMM

PackedGemmFn gemm_packed_fn();
ColumnsGemmFn gemm_columns_fn();
RowsGemmFn gemm_rows_fn();
Rows16GemmFn gemm_rows_16_fn();

}  // namespace rnnattn::cpu
