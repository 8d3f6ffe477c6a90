// The register-blocked kernel of packed_gemm.h, written with GCC vector extensions so that one source
// compiles to AVX2+FMA (8-float registers), to baseline SSE2 (pairs of 4-float registers) and, for
// the products of several rows, to AVX-512 (a panel in one 16-float register). Included by one .cpp
// per instruction set, which defines RNNATTN_CPU_ISA.
#pragma once
#include <algorithm>
#include <array>
#include <cstring>
#include <tuple>
#include <utility>
#include <vector>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "engine/cpu/packed_gemm.h"
#include "engine/cpu/vector8.h"

namespace rnnattn::cpu::RNNATTN_CPU_ISA {
namespace {

// kRows rows of a times kPanels adjacent 16-wide panels (width columns of them are real): the
// 2 * kRows * kPanels accumulators live in registers across k. An FMA waits ~4 cycles for its
// accumulator and two issue per cycle, so about 8 independent accumulators keep the units busy:
// few rows (a recurrent step at batch 1) take several panels at once instead.
// Blocks of at most this many rows are bound by streaming the panels from L2 (a step at batch 1-3):
// each k asks for the panels' line 8 k ahead, which the hardware prefetchers alone did not keep up
// with (one core's half of LSTM(256)'s W_hh at 1-3 rows 8-30% faster on a Xeon, AVX2 and AVX-512
// builds alike). The last k ask for the panel's last line again.
constexpr int kPrefetchMaxRows = 3;
constexpr int64_t kPrefetchAhead = 8;

// Keeps a loaded vector of weights in a register. Left alone, GCC folds the load into every row's
// FMA, which at 2-3 rows doubles or triples the loads from L1 for nothing (one core's half of
// LSTM(256)'s W_hh at 3 rows with AVX-512: 8.7 µs, 5.0 held). No-op in the baseline build, whose
// 8-float vectors are two registers.
template <typename Vector>
inline __attribute__((always_inline)) void hold_in_register([[maybe_unused]] Vector& v) {
#if defined(__AVX2__)
  asm("" : "+v"(v));
#endif
}

// Where a block kernel reads M (n x k) sixteen columns at a time: at(p, j) is the address of the 16
// values M[first + 16 p .. + 16][j] of the block's panel p. Packed (pack_matrix, pack_columns): the
// panels [panel][k][16]. By columns: M's column j, its n values contiguous (a row of M^T: of W_ih for
// dx = dg W_ih), at columns[j], read in place. Both give the kernels the same values in the same
// order, so the same sums bit for bit.
struct PackedPanels {
  const float* panels;
  int64_t panel_stride;  // k * 16
  const float* at(int p, int64_t j) const { return panels + p * panel_stride + j * kPanelWidth; }
  PackedPanels from(int64_t panel) const { return {panels + panel * panel_stride, panel_stride}; }
};
struct ColumnPanels {
  const float* const* columns;
  int64_t first;  // M's row of the panels' first column
  const float* at(int p, int64_t j) const { return columns[j] + first + p * kPanelWidth; }
  ColumnPanels from(int64_t panel) const { return {columns, first + panel * kPanelWidth}; }
};

template <int kRows, int kPanels, class Panels>
void block_kernel(const float* a, int64_t lda, Panels panels, int64_t k, const float* bias, float* out, int64_t ldo,
                  int64_t width, bool accumulate) {
  constexpr int kVecs = 2 * kPanels;
  vec8 acc[kRows][kVecs];
  vec8 start[kVecs] = {};
  if (bias != nullptr) {
    float padded[kVecs * 8] = {};
    std::memcpy(padded, bias, width * sizeof(float));
    for (int v = 0; v < kVecs; ++v) start[v] = load8(padded + 8 * v);
  }
  for (int r = 0; r < kRows; ++r) {
    for (int v = 0; v < kVecs; ++v) acc[r][v] = start[v];
    if (accumulate && width == kVecs * 8) {
      for (int v = 0; v < kVecs; ++v) acc[r][v] += load8(out + r * ldo + 8 * v);
    } else if (accumulate) {
      float padded[kVecs * 8] = {};
      std::memcpy(padded, out + r * ldo, width * sizeof(float));
      for (int v = 0; v < kVecs; ++v) acc[r][v] += load8(padded + 8 * v);
    }
  }
  for (int64_t j = 0; j < k; ++j) {
    vec8 w[kVecs];
    if constexpr (kRows <= kPrefetchMaxRows) {
      const int64_t ahead = std::min(j + kPrefetchAhead, k - 1);
      for (int p = 0; p < kPanels; ++p) __builtin_prefetch(panels.at(p, ahead));
    }
    for (int p = 0; p < kPanels; ++p) {
      w[2 * p] = load8(panels.at(p, j));
      w[2 * p + 1] = load8(panels.at(p, j) + 8);
      // At one row each weight is read once (folded loads are best); at more, hold the weights
      // where the 16 AVX registers leave room for them beside the accumulators and the broadcast.
      if constexpr (kRows >= 2 && kRows * kVecs + kVecs + 1 <= 16) {
        hold_in_register(w[2 * p]);
        hold_in_register(w[2 * p + 1]);
      }
    }
    for (int r = 0; r < kRows; ++r) {
      const float s = a[r * lda + j];
      const vec8 x = broadcast8(s);
      for (int v = 0; v < kVecs; ++v) acc[r][v] += x * w[v];
    }
  }
  for (int r = 0; r < kRows; ++r) {
    if (width == kVecs * 8) {
      for (int v = 0; v < kVecs; ++v) store8(out + r * ldo + 8 * v, acc[r][v]);
    } else {
      float tmp[kVecs * 8];
      for (int v = 0; v < kVecs; ++v) store8(tmp + 8 * v, acc[r][v]);
      std::memcpy(out + r * ldo, tmp, width * sizeof(float));
    }
  }
}

// The panels a call of the 8-float kernel takes for a block of `rows` rows: enough accumulators in
// flight (at most 6 rows: 12 accumulators + 2 weight vectors + 1 broadcast fit 16 AVX registers).
constexpr int panels_for(int rows) { return rows >= 4 ? 1 : rows >= 2 ? 2 : 4; }

#if defined(__AVX512F__)
typedef float vec16 __attribute__((vector_size(64)));

// block_kernel with each panel in one 16-float register: the same sums in the same order (one FMA
// per element and k, from the bias), so both kernels' results are bitwise equal. With 32 registers
// a block could hold up to 14 rows x 2 panels of accumulators; kMaxRows says why it holds 12.
template <int kRows, int kPanels, class Panels>
void wide_block_kernel(const float* a, int64_t lda, Panels panels, int64_t k, const float* bias, float* out,
                       int64_t ldo, int64_t width, bool accumulate) {
  vec16 acc[kRows][kPanels];
  vec16 start[kPanels] = {};
  if (bias != nullptr) {
    float padded[kPanels * 16] = {};
    std::memcpy(padded, bias, width * sizeof(float));
    std::memcpy(start, padded, sizeof(start));
  }
  for (int r = 0; r < kRows; ++r) {
    for (int p = 0; p < kPanels; ++p) acc[r][p] = start[p];
    if (accumulate) {
      // A whole block's width in one constant-size copy (inlined; a variable size calls the C
      // library's memmove, which took a third of a short backward's time), else zero-padded.
      vec16 padded[kPanels] = {};
      if (width == kPanels * 16) {
        std::memcpy(padded, out + r * ldo, sizeof(padded));
      } else {
        std::memcpy(padded, out + r * ldo, width * sizeof(float));
      }
      for (int p = 0; p < kPanels; ++p) acc[r][p] += padded[p];
    }
  }
  for (int64_t j = 0; j < k; ++j) {
    vec16 w[kPanels];
    for (int p = 0; p < kPanels; ++p) {
      std::memcpy(&w[p], panels.at(p, j), sizeof(vec16));
      hold_in_register(w[p]);  // 14 rows x 2 panels + 2 + 1 broadcast fit the 32 registers
    }
    for (int r = 0; r < kRows; ++r) {
      const float s = a[r * lda + j];
      const vec16 x = {s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s};
      for (int p = 0; p < kPanels; ++p) acc[r][p] += x * w[p];
    }
  }
  for (int r = 0; r < kRows; ++r) {
    if (width == kPanels * 16) {
      std::memcpy(out + r * ldo, acc[r], sizeof(acc[r]));
    } else {
      std::memcpy(out + r * ldo, acc[r], width * sizeof(float));
    }
  }
}

// Products of many rows ran 4-5% faster in blocks of at most 12 rows than of 13-14 (64 or 128 rows
// by one core's 1024 x 512 or 512 x 256 packed weights, both cores at once, on a Zen 4: 109-113
// GFLOP/s against 104-108), though one block of 14 rows alone ran as fast as one of 12.
constexpr int kMaxRows = 12;
// A block of one row takes the 8-float kernel: bound by streaming the weights from L2, it did no
// better with 64-byte loads. At 2-3 rows the 16-float kernel took 4.2 and 5.2 µs against 7.1 and
// 8.0 (one core's half of LSTM(256)'s W_hh), and from 4 rows on it did 1.4-1.6x the 8-float
// kernel's multiply-adds per second.
constexpr int kWideMinRows = 2;
static_assert(kWideMinRows <= 7, "block_of runs the 8-float kernel for at most 6 rows");
// 2-6 rows x 4 panels, 7-12 rows x 2 panels: 8-24 accumulators.
constexpr int wide_panels_for(int rows) { return rows >= 7 ? 2 : 4; }
#else
constexpr int kMaxRows = 6;
#endif

// Blocks of at most this many rows lose nothing to rows that share their L1 sets (spaced_stride).
constexpr int kAliasFreeRows = 8;

// The panels one block of `rows` rows takes (a multiple of 16 columns).
constexpr int block_panels(int rows) {
#if defined(__AVX512F__)
  if (rows >= kWideMinRows) return wide_panels_for(rows);
#endif
  return panels_for(rows);
}

template <int kRows, int kPanels, class Panels>
void block_of(const float* a, int64_t lda, Panels panels, int64_t k, const float* bias, float* out, int64_t ldo,
              int64_t width, bool accumulate) {
#if defined(__AVX512F__)
  if constexpr (kRows >= kWideMinRows) {
    return wide_block_kernel<kRows, kPanels>(a, lda, panels, k, bias, out, ldo, width, accumulate);
  }
#endif
  if constexpr (kRows <= 6) {
    block_kernel<kRows, kPanels>(a, lda, panels, k, bias, out, ldo, width, accumulate);
  }
}

template <int kRows, class Panels>
void row_block(int count, const float* a, int64_t lda, Panels panels, int64_t k, const float* bias, float* out,
               int64_t ldo, int64_t width, bool accumulate) {
  switch (count) {
    case 1: return block_of<kRows, 1>(a, lda, panels, k, bias, out, ldo, width, accumulate);
    case 2: return block_of<kRows, 2>(a, lda, panels, k, bias, out, ldo, width, accumulate);
    case 3: return block_of<kRows, 3>(a, lda, panels, k, bias, out, ldo, width, accumulate);
    default: return block_of<kRows, 4>(a, lda, panels, k, bias, out, ldo, width, accumulate);
  }
}

template <class Panels>
using RowBlockFn = void (*)(int, const float*, int64_t, Panels, int64_t, const float*, float*, int64_t, int64_t, bool);
template <class Panels, int... kIndex>
constexpr std::array<RowBlockFn<Panels>, sizeof...(kIndex)> row_block_table(std::integer_sequence<int, kIndex...>) {
  return {&row_block<kIndex + 1, Panels>...};
}
// row_block<r> at index r - 1, for 1 <= r <= kMaxRows.
template <class Panels>
constexpr auto kRowBlocks = row_block_table<Panels>(std::make_integer_sequence<int, kMaxRows>{});

template <class Panels>
void block(int rows, int count, const float* a, int64_t lda, Panels panels, int64_t k, const float* bias, float* out,
           int64_t ldo, int64_t width, bool accumulate) {
  kRowBlocks<Panels>[rows - 1](count, a, lda, panels, k, bias, out, ldo, width, accumulate);
}

// Panel p of M (n x k) whose column j is the n floats at columns[j], into dst (k x 16 floats,
// zero-padded past n).
void pack_column_panel(const float* const* columns, int64_t n, int64_t k, int64_t p, float* dst) {
  const int64_t first = p * kPanelWidth, width = std::min<int64_t>(kPanelWidth, n - first);
  for (int64_t j = 0; j < k; ++j, dst += kPanelWidth) {
    if (width == kPanelWidth) {
      std::memcpy(dst, columns[j] + first, kPanelWidth * sizeof(float));  // constant size: inlined
    } else {
      std::memcpy(dst, columns[j] + first, width * sizeof(float));
      std::fill(dst + width, dst + kPanelWidth, 0.f);
    }
  }
}

#if defined(__AVX2__)
// Columns [col, col + 8) of the eight rows `rows` transposed into dst (row stride ld_dst): eight
// loads, 24 shuffles and eight stores instead of 64 scalar moves.
inline void transpose_tile8(const float* const* rows, int64_t col, float* dst, int64_t ld_dst) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(rows[i] + col);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * ld_dst, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ld_dst, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}
#endif

// acc + x * y, fused where the build has FMA: said explicitly, so that the compiler's choice to
// contract or not cannot differ between M's element types.
inline __attribute__((always_inline)) float multiply_add(float x, float y, float acc) {
#if defined(__FMA__)
  return __builtin_fmaf(x, y, acc);
#else
  return acc + x * y;
#endif
}

// How the in-place product reads M's elements: floats as they are, 16-bit floats widened exactly
// (vector8.h), so that every type gives the sums of M's float copy.
struct FloatElements {
  using Type = float;
  static vec8 load(const float* p) { return load8(p); }
  static float one(float x) { return x; }
};
struct Bf16Elements {
  using Type = uint16_t;
  static vec8 load(const uint16_t* p) { return load8_bf16(p); }
  static float one(uint16_t x) { return widen_bf16(x); }
};
struct F16Elements {
  using Type = uint16_t;
  static vec8 load(const uint16_t* p) { return load8_f16(p); }
  static float one(uint16_t x) { return widen_f16(x); }
};

// Dot products of kRows rows of a with kCols rows of M (a row may repeat: its sums are then unused),
// into sums[r][c]; eight lanes per accumulator, reduced at the end, then the columns past the last
// multiple of 8 added in order. The kRows * kCols accumulators stay in registers (every loop over
// them has constant bounds) and the weights are read straight into the FMAs, so a pass keeps eight
// of them in flight: an FMA waits ~4 cycles for its accumulator.
template <int kRows, int kCols, class Elements>
inline __attribute__((always_inline)) void dot_rows(const float* a, int64_t lda,
                                                    const typename Elements::Type* const* m_rows, int64_t k,
                                                    float sums[][kCols]) {
  vec8 acc[kRows][kCols];
  for (int r = 0; r < kRows; ++r) {
    for (int c = 0; c < kCols; ++c) acc[r][c] = vec8{};
  }
  int64_t j = 0;
  for (; j + 8 <= k; j += 8) {
    vec8 w[kCols];
    for (int c = 0; c < kCols; ++c) {
      w[c] = Elements::load(m_rows[c] + j);
      if constexpr (kRows >= 2) hold_in_register(w[c]);  // one load for every row (block_kernel's reason)
    }
    for (int r = 0; r < kRows; ++r) {
      const vec8 x = load8(a + r * lda + j);
      for (int c = 0; c < kCols; ++c) acc[r][c] += x * w[c];
    }
  }
  for (int r = 0; r < kRows; ++r) {
    for (int c = 0; c < kCols; ++c) sums[r][c] = sum8(acc[r][c]);
  }
  for (; j < k; ++j) {
    for (int r = 0; r < kRows; ++r) {
      for (int c = 0; c < kCols; ++c) {
        sums[r][c] = multiply_add(a[r * lda + j], Elements::one(m_rows[c][j]), sums[r][c]);
      }
    }
  }
}

// dot_rows out of line: inlined at more than one row it left the weights' register hold to the
// stack (2 and 4 rows took twice as long).
template <int kRows, int kCols, class Elements>
__attribute__((noinline)) void dot_rows_call(const float* a, int64_t lda, const typename Elements::Type* const* m_rows,
                                             int64_t k, float sums[][kCols]) {
  dot_rows<kRows, kCols, Elements>(a, lda, m_rows, k, sums);
}

// out[r][c0 + c] for c < count of kRows rows of a and M's rows c0.. (kCols at a time; M n x k, its
// rows at m_rows). A whole pass (all but the last) has constant bounds throughout and, at one row,
// the dot products inline: one core's half of LSTM(256)'s W_hh at one row 4.75 -> 4.2 µs on a Xeon,
// 7.4 -> 6.9 at two.
template <int kRows, int kCols, class Elements>
void rows_pass(const float* a, int64_t lda, const typename Elements::Type* const* all_rows, int64_t n, int64_t k,
               int64_t c0, const float* bias, float* out, int64_t ldo) {
  const int count = static_cast<int>(std::min<int64_t>(kCols, n - c0));
  const typename Elements::Type* m_rows[kCols];
  float sums[kRows][kCols];
  if (count == kCols) {
    for (int c = 0; c < kCols; ++c) m_rows[c] = all_rows[c0 + c];
    if constexpr (kRows == 1) {
      dot_rows<kRows, kCols, Elements>(a, lda, m_rows, k, sums);
    } else {
      dot_rows_call<kRows, kCols, Elements>(a, lda, m_rows, k, sums);
    }
    for (int r = 0; r < kRows; ++r) {
      for (int c = 0; c < kCols; ++c) out[r * ldo + c0 + c] = sums[r][c] + (bias ? bias[c0 + c] : 0.f);
    }
    return;
  }
  for (int c = 0; c < kCols; ++c) m_rows[c] = all_rows[c0 + std::min(c, count - 1)];
  dot_rows_call<kRows, kCols, Elements>(a, lda, m_rows, k, sums);
  for (int r = 0; r < kRows; ++r) {
    for (int c = 0; c < count; ++c) out[r * ldo + c0 + c] = sums[r][c] + (bias ? bias[c0 + c] : 0.f);
  }
}

// gemm_rows for M's rows of any element type.
// At one row, `last_first` reads M's rows from the last: a caller that reads a matrix larger than
// the core's cache every call alternates the order, so that each call starts with the rows the last
// one read last, still in cache (each sum is the same either way).
template <class Elements>
void gemm_rows_of(const float* a, int64_t rows, int64_t lda, const typename Elements::Type* const* m_rows, int64_t n,
                  int64_t k, const float* bias, float* out, int64_t ldo, bool last_first) {
  if (rows == 1) {
    // One row of a (a batch-1 step): eight rows of M per pass, the passes in either order.
    const int64_t passes = (n + 7) / 8;
    for (int64_t i = 0; i < passes; ++i) {
      const int64_t c0 = 8 * (last_first ? passes - 1 - i : i);
      rows_pass<1, 8, Elements>(a, lda, m_rows, n, k, c0, bias, out, ldo);
    }
    return;
  }
  for (int64_t c0 = 0; c0 < n; c0 += 4) {
    // Two rows of a per pass (four rows of M): eight accumulators again.
    for (int64_t r = 0; r < rows; r += 2) {
      if (rows - r >= 2) {
        rows_pass<2, 4, Elements>(a + r * lda, lda, m_rows, n, k, c0, bias, out + r * ldo, ldo);
      } else {
        rows_pass<1, 4, Elements>(a + r * lda, lda, m_rows, n, k, c0, bias, out + r * ldo, ldo);
      }
    }
  }
}

}  // namespace

void gemm_rows(const float* a, int64_t rows, int64_t lda, const RowsMatrix& m, const float* bias, float* out,
               int64_t ldo) {
  gemm_rows_of<FloatElements>(a, rows, lda, m.rows, m.n, m.k, bias, out, ldo, m.last_first);
}

void gemm_rows_16(const float* a, int64_t rows, int64_t lda, const Rows16Matrix& m, const float* bias, float* out,
                  int64_t ldo) {
  if (m.kind == Float16Kind::bfloat16) {
    gemm_rows_of<Bf16Elements>(a, rows, lda, m.rows, m.n, m.k, bias, out, ldo, m.last_first);
  } else {
    gemm_rows_of<F16Elements>(a, rows, lda, m.rows, m.n, m.k, bias, out, ldo, m.last_first);
  }
}

PackedMatrix pack_matrix(const float* const* m_rows, int64_t n, int64_t k, int64_t stride_k, float* storage) {
  PackedMatrix out;
  out.n = n;
  out.k = k;
  out.panels = storage;
  const int64_t panels = panel_count(n);
  for (int64_t p = 0; p < panels; ++p) {
    float* panel = storage + p * k * kPanelWidth;
    const int64_t width = std::min<int64_t>(kPanelWidth, n - p * kPanelWidth);
    if (width < kPanelWidth) std::fill(panel, panel + k * kPanelWidth, 0.f);
    const float* const* rows = m_rows + p * kPanelWidth;
    int64_t done = 0;  // columns of M packed by whole tiles
#if defined(__AVX2__)
    if (stride_k == 1 && width == kPanelWidth) {
      // Rows contiguous in memory, the usual case: 8 x 8 tiles transposed in registers.
      for (; done + 8 <= k; done += 8) {
        for (int64_t i = 0; i < kPanelWidth; i += 8) {
          transpose_tile8(rows + i, done, panel + done * kPanelWidth + i, kPanelWidth);
        }
      }
    }
#endif
    for (int64_t j = done; j < k; ++j) {
      for (int64_t i = 0; i < width; ++i) panel[j * kPanelWidth + i] = rows[i][j * stride_k];
    }
  }
  return out;
}

PackedMatrix pack_columns(const float* const* columns, int64_t n, int64_t k, float* storage, int64_t panel_begin,
                          int64_t panel_end) {
  for (int64_t p = panel_begin; p < panel_end; ++p) pack_column_panel(columns, n, k, p, storage + p * k * kPanelWidth);
  PackedMatrix out;
  out.n = n;
  out.k = k;
  out.panels = storage;
  return out;
}

void transpose(const float* src, int64_t rows, int64_t cols, int64_t ld_src, float* dst, int64_t ld_dst) {
  int64_t r0 = 0;
#if defined(__AVX2__)
  for (; r0 + 8 <= rows; r0 += 8) {
    const float* tile_rows[8];
    for (int q = 0; q < 8; ++q) tile_rows[q] = src + (r0 + q) * ld_src;
    int64_t c0 = 0;
    for (; c0 + 8 <= cols; c0 += 8) transpose_tile8(tile_rows, c0, dst + c0 * ld_dst + r0, ld_dst);
    for (; c0 < cols; ++c0) {
      for (int q = 0; q < 8; ++q) dst[c0 * ld_dst + r0 + q] = tile_rows[q][c0];
    }
  }
#endif
  for (; r0 < rows; ++r0) {
    for (int64_t c = 0; c < cols; ++c) dst[c * ld_dst + r0] = src[r0 * ld_src + c];
  }
}

void add_row_sums(const float* a, int64_t rows, int64_t cols, int64_t lda, float* sums) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = a + r * lda;
    vec8 acc[4] = {};  // four chains: an add waits ~3 cycles for its accumulator
    int64_t c = 0;
    for (; c + 32 <= cols; c += 32) {
      for (int v = 0; v < 4; ++v) acc[v] += load8(row + c + 8 * v);
    }
    for (; c + 8 <= cols; c += 8) acc[0] += load8(row + c);
    float sum = sum8((acc[0] + acc[1]) + (acc[2] + acc[3]));
    for (; c < cols; ++c) sum += row[c];
    sums[r] += sum;
  }
}

namespace {

// a's rows, if they are a multiple of 4 KiB apart and the blocks of the product would be more than
// kAliasFreeRows rows, copied once into rows that do not share their L1 sets (64 rows of k = 1024:
// 93 GFLOP/s in place, 111 copied), a buffer the thread keeps for its next product; else a as it is.
std::pair<const float*, int64_t> alias_free_rows(const float* a, int64_t rows, int64_t lda, int64_t k) {
  const int64_t row_blocks = (rows + kMaxRows - 1) / kMaxRows;
  if (rows / row_blocks <= kAliasFreeRows || lda % kSetAliasFloats != 0) return {a, lda};
  thread_local std::vector<float> spaced;
  const int64_t ld = spaced_stride(k);
  spaced.resize(static_cast<size_t>(rows * ld));
  for (int64_t r = 0; r < rows; ++r) std::memcpy(spaced.data() + r * ld, a + r * lda, k * sizeof(float));
  return {spaced.data(), ld};
}

// A product of `rows` rows: its rows split evenly into blocks of at most kMaxRows (7 rows: 4 + 3,
// not 6 + 1), each block of rows through groups of this many panels.
int64_t panels_per_group(int64_t rows) {
  const int64_t row_blocks = (rows + kMaxRows - 1) / kMaxRows;
  return block_panels(static_cast<int>(rows / row_blocks));
}

// out[:, :n] = a @ M^T for M's `panels` panels of 16 columns (n columns of them real) read through
// `m`, bias and out already at the panels' first column.
template <class Panels>
void gemm_panels(const float* a, int64_t rows, int64_t lda, Panels m, int64_t panels, int64_t n, int64_t k,
                 const float* bias, float* out, int64_t ldo, bool accumulate) {
  const int64_t row_blocks = (rows + kMaxRows - 1) / kMaxRows;
  const int64_t group = panels_per_group(rows);
  // Panel groups outside, rows inside: a group's panels stay in cache while every row block uses them.
  for (int64_t p = 0; p < panels; p += group) {
    const int count = static_cast<int>(std::min(group, panels - p));
    const int64_t col = p * kPanelWidth;
    const int64_t width = std::min<int64_t>(count * kPanelWidth, n - col);
    for (int64_t b = 0, r = 0; b < row_blocks; ++b) {
      const int64_t next = rows * (b + 1) / row_blocks;
      block(static_cast<int>(next - r), count, a + r * lda, lda, m.from(p), k, bias ? bias + col : nullptr,
            out + r * ldo + col, ldo, width, accumulate);
      r = next;
    }
  }
}

}  // namespace

void gemm_packed(const float* a, int64_t rows, int64_t lda, const PackedMatrix& m, const float* bias, float* out,
                 int64_t ldo, bool accumulate) {
  if (rows == 0 || m.n == 0) return;
  std::tie(a, lda) = alias_free_rows(a, rows, lda, m.k);
  gemm_panels(a, rows, lda, PackedPanels{m.panels, m.k * kPanelWidth}, panel_count(m.n), m.n, m.k, bias, out, ldo,
              accumulate);
}

void gemm_columns(const float* a, int64_t rows, int64_t lda, const ColumnsMatrix& m, const float* bias, float* out,
                  int64_t ldo, bool accumulate) {
  if (rows == 0 || m.n == 0) return;
  std::tie(a, lda) = alias_free_rows(a, rows, lda, m.k);
  const int64_t panels = panel_count(m.n), whole = m.n / kPanelWidth;  // whole: 16 real columns
  int64_t p = 0;  // the panels before p are done
  if (rows <= kMaxRows) {
    // One block of rows reads each of M's elements once: straight from its column.
    gemm_panels(a, rows, lda, ColumnPanels{m.columns, 0}, whole, whole * kPanelWidth, m.k, bias, out, ldo,
                accumulate);
    p = whole;
  }
  // Otherwise every block of rows reads a group of panels again, and columns a power of two apart
  // (W_ih's rows, 1-2 KiB at 256-512 inputs) fall into a few cache sets, so that re-reading them in
  // place took up to 1.35x the packed product: each group is packed first into a buffer that the
  // blocks read from cache (the thread keeps it for its next product). So is a last panel narrower
  // than 16 columns, which the kernels read whole (no read past a column's end).
  if (p == panels) return;
  const int64_t group = rows <= kMaxRows ? 1 : panels_per_group(rows);
  thread_local std::vector<float> packed;
  packed.resize(static_cast<size_t>(group * m.k * kPanelWidth));
  for (; p < panels; p += group) {
    const int64_t count = std::min(group, panels - p), first = p * kPanelWidth;
    for (int64_t q = 0; q < count; ++q) {
      pack_column_panel(m.columns, m.n, m.k, p + q, packed.data() + q * m.k * kPanelWidth);
    }
    gemm_panels(a, rows, lda, PackedPanels{packed.data(), m.k * kPanelWidth}, count, m.n - first, m.k,
                bias ? bias + first : nullptr, out + first, ldo, accumulate);
  }
}

}  // namespace rnnattn::cpu::RNNATTN_CPU_ISA
