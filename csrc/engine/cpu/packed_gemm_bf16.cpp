// The bfloat16 packed GEMM (packed_gemm_bf16.h), compiled with -mavx512f -mavx512bf16 (see
// CMakeLists.txt) and called only where bf16_products_available() (kernel_isa.cpp). The blocking is
// that of the float kernel's AVX-512 build: a block of up to 12 rows x 2 panels of float sums in
// registers, each pair of panel words feeding every row of the block.
#include "engine/cpu/packed_gemm_bf16.h"

#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace rnnattn::cpu {

#if defined(__AVX512BF16__)
namespace {

// words[w * kPanelWidth + c] = rows[c][w] for 16 rows of 16 words each (w < count): a 16 x 16
// transpose of 32-bit words, in 128-bit lanes of 4 x 4 blocks.
void store_transposed(const __m512i (&rows)[16], uint32_t* words, int64_t count) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {  // pairs of rows interleaved: per lane (r0[4l], r1[4l], r0[4l+1], r1[4l+1]), ...
    t[2 * i] = _mm512_unpacklo_epi32(rows[2 * i], rows[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(rows[2 * i], rows[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // u[4i + m], lane l: word 4l + m of rows 4i .. 4i + 3
    u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int m = 0; m < 4; ++m) {  // a 4 x 4 transpose of lanes: word 4l + m of all 16 rows
    const __m512i b0 = _mm512_shuffle_i32x4(u[m], u[4 + m], 0x88), b1 = _mm512_shuffle_i32x4(u[m], u[4 + m], 0xdd);
    const __m512i b2 = _mm512_shuffle_i32x4(u[8 + m], u[12 + m], 0x88);
    const __m512i b3 = _mm512_shuffle_i32x4(u[8 + m], u[12 + m], 0xdd);
    const __m512i lanes[4] = {_mm512_shuffle_i32x4(b0, b2, 0x88), _mm512_shuffle_i32x4(b1, b3, 0x88),
                              _mm512_shuffle_i32x4(b0, b2, 0xdd), _mm512_shuffle_i32x4(b1, b3, 0xdd)};
    for (int l = 0; l < 4; ++l) {
      if (4 * l + m < count) _mm512_storeu_si512(words + (4 * l + m) * kPanelWidth, lanes[l]);
    }
  }
}

// One panel of M with unit column stride: 16 rows' runs of 32 floats rounded to 16 pairs each
// (vcvtne2ps2bf16), then transposed into the panel's pair-major words.
void pack_panel_unit_stride(const float* const* rows, int64_t width, int64_t k, uint32_t* panel) {
  const int64_t pairs = PackedBf16Matrix::pairs(k);
  for (int64_t j0 = 0; j0 < pairs; j0 += 16) {
    const int64_t left = k - 2 * j0;  // floats of each row from here on
    const __mmask16 low = static_cast<__mmask16>(left >= 16 ? 0xffffu : (1u << left) - 1u);
    const __mmask16 high = static_cast<__mmask16>(left >= 32 ? 0xffffu : left <= 16 ? 0u : (1u << (left - 16)) - 1u);
    __m512i words[16];
    for (int c = 0; c < 16; ++c) {
      if (c >= width) {
        words[c] = _mm512_setzero_si512();
        continue;
      }
      const float* from = rows[c] + 2 * j0;
      const __m512bh halves =
          _mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(high, from + 16), _mm512_maskz_loadu_ps(low, from));
      words[c] = reinterpret_cast<__m512i>(halves);
    }
    store_transposed(words, panel + j0 * kPanelWidth, std::min<int64_t>(16, pairs - j0));
  }
}

}  // namespace
#endif

PackedBf16Matrix pack_matrix_bf16(const float* const* rows, int64_t n, int64_t k, int64_t stride_k,
                                  uint32_t* storage) {
  PackedBf16Matrix out;
  out.n = n;
  out.k = k;
  out.panels = storage;
  const int64_t pairs = PackedBf16Matrix::pairs(k);
  for (int64_t p = 0; p < panel_count(n); ++p) {
    uint32_t* panel = storage + p * pairs * kPanelWidth;
    const int64_t width = std::min<int64_t>(kPanelWidth, n - p * kPanelWidth);
#if defined(__AVX512BF16__)
    if (stride_k == 1) {
      pack_panel_unit_stride(rows + p * kPanelWidth, width, k, panel);
      continue;
    }
#endif
    for (int64_t j = 0; j < pairs; ++j) {
      uint32_t* words = panel + j * kPanelWidth;
      for (int64_t c = 0; c < kPanelWidth; ++c) {
        if (c >= width) {
          words[c] = 0;
          continue;
        }
        const float* row = rows[p * kPanelWidth + c];
        const uint32_t low = to_bfloat16(row[2 * j * stride_k]);
        const uint32_t high = 2 * j + 1 < k ? to_bfloat16(row[(2 * j + 1) * stride_k]) : 0u;
        words[c] = low | (high << 16);
      }
    }
  }
  return out;
}

PackedBf16Matrix pack_columns_bf16(const float* const* columns, int64_t n, int64_t k, uint32_t* storage,
                                   int64_t panel_begin, int64_t panel_end) {
  const int64_t pairs = PackedBf16Matrix::pairs(k);
  for (int64_t p = panel_begin; p < panel_end; ++p) {
    uint32_t* panel = storage + p * pairs * kPanelWidth;
    const int64_t first = p * kPanelWidth, width = std::min<int64_t>(kPanelWidth, n - first);
#if defined(__AVX512BF16__)
    // The panel's 16 columns of a row of M^T rounded at once, each into the low half of a word.
    const __mmask16 live = static_cast<__mmask16>((1u << width) - 1u);
    auto rounded = [&](const float* from) {
      if (from == nullptr) return _mm512_setzero_si512();
      const __m256bh halves = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(live, from));
      return _mm512_cvtepu16_epi32(reinterpret_cast<__m256i>(halves));
    };
#endif
    for (int64_t j = 0; j < pairs; ++j) {
      const float* low = columns[2 * j] + first;
      const float* high = 2 * j + 1 < k ? columns[2 * j + 1] + first : nullptr;  // none: a zero half
      uint32_t* words = panel + j * kPanelWidth;
#if defined(__AVX512BF16__)
      _mm512_storeu_si512(words, _mm512_or_si512(rounded(low), _mm512_slli_epi32(rounded(high), 16)));
#else
      for (int64_t c = 0; c < kPanelWidth; ++c) {
        const uint32_t lo = c < width ? to_bfloat16(low[c]) : 0u;
        const uint32_t hi = c < width && high != nullptr ? to_bfloat16(high[c]) : 0u;
        words[c] = lo | (hi << 16);
      }
#endif
    }
  }
  PackedBf16Matrix out;
  out.n = n;
  out.k = k;
  out.panels = storage;
  return out;
}

#if defined(__AVX512BF16__)
namespace {

constexpr int kMaxRows = 12;  // 12 x 2 sums, 2 panel vectors and a broadcast fit the 32 registers

// a's rows rounded to bfloat16, each followed by a zero when k is odd: ld_words pairs a row.
void round_rows(const float* a, int64_t rows, int64_t lda, int64_t k, uint32_t* out, int64_t ld_words) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* src = a + r * lda;
    auto* dst = reinterpret_cast<uint16_t*>(out + r * ld_words);
    int64_t j = 0;
    for (; j + 16 <= k; j += 16) {
      const __m256bh rounded = _mm512_cvtneps_pbh(_mm512_loadu_ps(src + j));
      std::memcpy(dst + j, &rounded, sizeof(rounded));
    }
    if (j < k) {
      // The tail through a zero-padded vector: the same rounding as the rest of the row.
      float tail[16] = {};
      std::memcpy(tail, src + j, (k - j) * sizeof(float));
      const __m256bh rounded = _mm512_cvtneps_pbh(_mm512_loadu_ps(tail));
      std::memcpy(dst + j, &rounded, (k - j) * sizeof(uint16_t));
    }
    if (k % 2 != 0) dst[k] = 0;
  }
}

// width floats (at most kPanels panels) into a zero-padded block: a whole block's width in one
// constant-size copy, inlined (a variable size calls the C library's memmove, as the float kernel
// found at a cost of a third of a short backward).
template <int kPanels>
void copy_padded(float (&padded)[kPanels * kPanelWidth], const float* from, int64_t width) {
  if (width == kPanels * kPanelWidth) {
    std::memcpy(padded, from, sizeof(padded));
  } else {
    std::memcpy(padded, from, width * sizeof(float));
  }
}

template <int kRows, int kPanels>
void block_kernel(const uint32_t* a, int64_t ld_words, const uint32_t* panels, int64_t panel_stride, int64_t pairs,
                  const float* bias, float* out, int64_t ldo, int64_t width, bool accumulate) {
  __m512 start[kPanels];
  {
    float padded[kPanels * kPanelWidth] = {};
    if (bias != nullptr) copy_padded<kPanels>(padded, bias, width);
    for (int p = 0; p < kPanels; ++p) start[p] = _mm512_loadu_ps(padded + p * kPanelWidth);
  }
  __m512 acc[kRows][kPanels];
  for (int r = 0; r < kRows; ++r) {
    for (int p = 0; p < kPanels; ++p) acc[r][p] = start[p];
    if (accumulate) {
      float padded[kPanels * kPanelWidth] = {};
      copy_padded<kPanels>(padded, out + r * ldo, width);
      for (int p = 0; p < kPanels; ++p) acc[r][p] = _mm512_add_ps(acc[r][p], _mm512_loadu_ps(padded + p * kPanelWidth));
    }
  }
  for (int64_t j = 0; j < pairs; ++j) {
    __m512bh w[kPanels];
    for (int p = 0; p < kPanels; ++p) {
      w[p] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(panels + p * panel_stride + j * kPanelWidth));
    }
    for (int r = 0; r < kRows; ++r) {
      const __m512bh x = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(a[r * ld_words + j])));
      for (int p = 0; p < kPanels; ++p) acc[r][p] = _mm512_dpbf16_ps(acc[r][p], x, w[p]);
    }
  }
  for (int r = 0; r < kRows; ++r) {
    if (width == kPanels * kPanelWidth) {
      for (int p = 0; p < kPanels; ++p) _mm512_storeu_ps(out + r * ldo + p * kPanelWidth, acc[r][p]);
    } else {
      float sums[kPanels * kPanelWidth];
      for (int p = 0; p < kPanels; ++p) _mm512_storeu_ps(sums + p * kPanelWidth, acc[r][p]);
      std::memcpy(out + r * ldo, sums, width * sizeof(float));
    }
  }
}

using BlockFn = void (*)(const uint32_t*, int64_t, const uint32_t*, int64_t, int64_t, const float*, float*, int64_t,
                         int64_t, bool);

template <int... kRows>
constexpr auto block_table(std::integer_sequence<int, kRows...>) {
  struct Table {
    BlockFn fn[2][sizeof...(kRows)];
  };
  return Table{{{&block_kernel<kRows + 1, 1>...}, {&block_kernel<kRows + 1, 2>...}}};
}
constexpr auto kBlocks = block_table(std::make_integer_sequence<int, kMaxRows>());

}  // namespace

void gemm_packed_bf16(const float* a, int64_t rows, int64_t lda, const PackedBf16Matrix& m, const float* bias,
                      float* out, int64_t ldo, bool accumulate) {
  if (rows == 0 || m.n == 0) return;
  const int64_t pairs = PackedBf16Matrix::pairs(m.k);
  // a in bfloat16, once per product, in a buffer the thread keeps for its next one.
  thread_local std::vector<uint32_t> rounded;
  rounded.resize(static_cast<size_t>(rows * pairs));
  round_rows(a, rows, lda, m.k, rounded.data(), pairs);
  const int64_t panels = panel_count(m.n), panel_stride = pairs * kPanelWidth;
  // Rows split evenly into blocks of at most kMaxRows (13 rows: 7 + 6, not 12 + 1).
  const int64_t row_blocks = (rows + kMaxRows - 1) / kMaxRows;
  // Panel pairs outside, rows inside: a pair's panels stay in cache while every row block uses them.
  for (int64_t p = 0; p < panels; p += 2) {
    const int count = static_cast<int>(std::min<int64_t>(2, panels - p));
    const int64_t col = p * kPanelWidth;
    const int64_t width = std::min<int64_t>(count * kPanelWidth, m.n - col);
    for (int64_t b = 0, r = 0; b < row_blocks; ++b) {
      const int64_t next = rows * (b + 1) / row_blocks;
      kBlocks.fn[count - 1][next - r - 1](rounded.data() + r * pairs, pairs, m.panels + p * panel_stride,
                                          panel_stride, pairs, bias ? bias + col : nullptr, out + r * ldo + col, ldo,
                                          width, accumulate);
      r = next;
    }
  }
}

#else
// Without AVX512-BF16 (another architecture, or a compiler that lacks it) bf16_products_available()
// is false and the engine never calls this; it computes the same sums one by one all the same.
void gemm_packed_bf16(const float* a, int64_t rows, int64_t lda, const PackedBf16Matrix& m, const float* bias,
                      float* out, int64_t ldo, bool accumulate) {
  const int64_t pairs = PackedBf16Matrix::pairs(m.k);
  auto widen = [](uint32_t half) {
    const uint32_t bits = half << 16;
    float value;
    std::memcpy(&value, &bits, sizeof(value));
    return value;
  };
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < m.n; ++c) {
      const uint32_t* column = m.panels + (c / kPanelWidth) * pairs * kPanelWidth + c % kPanelWidth;
      float sum = (bias ? bias[c] : 0.f) + (accumulate ? out[r * ldo + c] : 0.f);
      for (int64_t j = 0; j < m.k; ++j) {
        const uint32_t word = column[(j / 2) * kPanelWidth];
        sum += widen(to_bfloat16(a[r * lda + j])) * widen(j % 2 == 0 ? word & 0xffffu : word >> 16);
      }
      out[r * ldo + c] = sum;
    }
  }
}
#endif

}  // namespace rnnattn::cpu
