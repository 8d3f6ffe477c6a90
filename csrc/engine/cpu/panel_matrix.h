// A matrix for our CPU GEMM in one of its forms: float panels (packed_gemm.h), for a bfloat16
// layer's products bfloat16 pairs (packed_gemm_bf16.h), or float columns read in place. The engine
// packs and multiplies through this one type, so a product's code does not depend on the form.
// Torch-free.
#pragma once
#include <cstdint>

#include "engine/cpu/packed_gemm.h"
#include "engine/cpu/packed_gemm_bf16.h"

namespace rnnattn::cpu {

struct PanelMatrix {
  bool bf16 = false;
  PackedMatrix f32;         // the float form (bf16 false)
  PackedBf16Matrix pairs;   // the bfloat16 form (bf16 true)
  // Float M not packed but read in place by its columns (columns_in_place): the packed form's sums.
  bool in_place = false;
  ColumnsMatrix columns;

  // Floats of storage for M (n x k) in the form (a bfloat16 pair is one float's size).
  static int64_t floats_needed(bool bf16, int64_t n, int64_t k) {
    static_assert(sizeof(float) == sizeof(uint32_t));
    return bf16 ? PackedBf16Matrix::words_needed(n, k) : PackedMatrix::floats_needed(n, k);
  }

  // M (n x k) to be packed into storage (floats_needed(bf16, n, k) floats): the panels' address and
  // shape, before (or without) any panel written.
  static PanelMatrix room(bool bf16, int64_t n, int64_t k, float* storage) {
    PanelMatrix m;
    m.bf16 = bf16;
    if (bf16) {
      m.pairs = {n, k, reinterpret_cast<uint32_t*>(storage)};
    } else {
      m.f32 = {n, k, storage};
    }
    return m;
  }

  // Where the panels are (room's storage).
  float* storage() const { return bf16 ? reinterpret_cast<float*>(pairs.panels) : f32.panels; }

  // out = a @ M^T (+ bias), or out += a @ M^T (+ bias) with accumulate (packed_gemm.h).
  void multiply(const float* a, int64_t rows, int64_t lda, const float* bias, float* out, int64_t ldo,
                bool accumulate) const {
    if (in_place) {
      gemm_columns_fn()(a, rows, lda, columns, bias, out, ldo, accumulate);
    } else if (bf16) {
      gemm_packed_bf16(a, rows, lda, pairs, bias, out, ldo, accumulate);
    } else {
      gemm_packed_fn()(a, rows, lda, f32, bias, out, ldo, accumulate);
    }
  }
};

// pack_matrix / pack_matrix_bf16 in the form asked for.
inline PanelMatrix pack_matrix(bool bf16, const float* const* rows, int64_t n, int64_t k, int64_t stride_k,
                               float* storage) {
  PanelMatrix m = PanelMatrix::room(bf16, n, k, storage);
  if (bf16) {
    m.pairs = pack_matrix_bf16(rows, n, k, stride_k, m.pairs.panels);
  } else {
    m.f32 = pack_matrix(rows, n, k, stride_k, storage);
  }
  return m;
}

// pack_columns / pack_columns_bf16 (panels [panel_begin, panel_end)) in the form asked for.
inline PanelMatrix pack_columns(bool bf16, const float* const* columns, int64_t n, int64_t k, float* storage,
                                int64_t panel_begin, int64_t panel_end) {
  PanelMatrix m = PanelMatrix::room(bf16, n, k, storage);
  if (bf16) {
    m.pairs = pack_columns_bf16(columns, n, k, m.pairs.panels, panel_begin, panel_end);
  } else {
    m.f32 = pack_columns(columns, n, k, storage, panel_begin, panel_end);
  }
  return m;
}

// M (n x k) whose column j is the n floats at columns[j] (as pack_columns takes it), read where it is.
inline PanelMatrix columns_in_place(const float* const* columns, int64_t n, int64_t k) {
  PanelMatrix m;
  m.in_place = true;
  m.columns = {columns, n, k};
  return m;
}

}  // namespace rnnattn::cpu
