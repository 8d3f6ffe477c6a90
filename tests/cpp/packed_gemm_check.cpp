// The CPU GEMM builds (csrc/engine/cpu/packed_gemm*.{h,cpp}) against the sums they must compute, on
// the host, by tests/test_cpu_gemm.py. gemm_packed makes every element one chain of multiply-adds
// in k order from the bias (or zero), so it is compared bit for bit with that chain (fused in the
// AVX2 and AVX-512 builds, unfused in the baseline one), and so is gemm_columns (M by its columns,
// read in place or packed a group at a time); gemm_rows sums in lanes, so it is compared
// with a double sum within float rounding. Every case also checks that nothing outside the output's
// rows and columns was written. Shapes: 0-30 rows (every block size of both builds, one and several
// blocks), partial panels, k from 0, padded leading dimensions, rows of M taken through a shuffled
// table of addresses and with a column stride (the packing's two paths), sums accumulated into the
// output, and rows of a 4 KiB apart (which the product copies first). The backward's helpers too:
// pack_columns against pack_matrix of the same matrix, transpose exactly, add_row_sums in rounding.
// gemm_rows_16 (M's rows as bfloat16 or float16) bit for bit against gemm_rows on the same values as
// floats.
//
// This file compiles the baseline build itself (RNNATTN_CPU_ISA baseline, with -ffp-contract=off);
// the AVX2 and AVX-512 builds are the library's own sources, compiled with the library's flags and
// linked in when defined(RNNATTN_CHECK_AVX2) / defined(RNNATTN_CHECK_AVX512).
#define RNNATTN_CPU_ISA baseline
#include "engine/cpu/packed_gemm_impl.h"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

using namespace rnnattn::cpu;

namespace {

struct Build {
  const char* name;
  bool fused;  // whether its products and sums are one FMA each
  PackedMatrix (*pack)(const float* const*, int64_t, int64_t, int64_t, float*);
  void (*packed)(const float*, int64_t, int64_t, const PackedMatrix&, const float*, float*, int64_t, bool);
  void (*columns)(const float*, int64_t, int64_t, const ColumnsMatrix&, const float*, float*, int64_t, bool);
  void (*rows)(const float*, int64_t, int64_t, const RowsMatrix&, const float*, float*, int64_t);
  void (*rows_16)(const float*, int64_t, int64_t, const Rows16Matrix&, const float*, float*, int64_t);
  PackedMatrix (*pack_columns)(const float* const*, int64_t, int64_t, float*, int64_t, int64_t);
  void (*transpose)(const float*, int64_t, int64_t, int64_t, float*, int64_t);
  void (*add_row_sums)(const float*, int64_t, int64_t, int64_t, float*);
};

struct Tally {
  int64_t cases = 0, mismatched = 0;
  void fail(const std::string& what) {
    if (++mismatched <= 10) std::printf("  mismatch: %s\n", what.c_str());
  }
};

bool same_bits(float a, float b) { return std::memcmp(&a, &b, sizeof(float)) == 0; }

// One product. lda 0: k + 3; accumulate: out starts as random numbers the sums must start from.
void check_case(const Build& build, int64_t rows, int64_t n, int64_t k, bool with_bias, int64_t stride_k,
                std::mt19937& gen, Tally& tally, int64_t lda = 0, bool accumulate = false) {
  std::normal_distribution<float> normal;
  if (lda == 0) lda = k + 3;
  const int64_t ldo = n + 5;
  std::vector<float> a(rows * lda + 1), bias(n), storage(n * k * stride_k + 1), initial(rows * n);
  for (auto& v : a) v = normal(gen);
  for (auto& v : bias) v = normal(gen);
  for (auto& v : storage) v = normal(gen);
  for (auto& v : initial) v = normal(gen);
  // M's row i is the storage row order[i] (a shuffled table, as the engine's row permutations).
  std::vector<int64_t> order(n);
  for (int64_t i = 0; i < n; ++i) order[i] = i;
  std::shuffle(order.begin(), order.end(), gen);
  std::vector<const float*> m_rows(n);
  for (int64_t i = 0; i < n; ++i) m_rows[i] = storage.data() + order[i] * k * stride_k;
  auto m_at = [&](int64_t i, int64_t j) { return m_rows[i][j * stride_k]; };
  const float* b = with_bias ? bias.data() : nullptr;
  const std::string shape = std::string(build.name) + " rows " + std::to_string(rows) + " n " + std::to_string(n) +
                            " k " + std::to_string(k) + " lda " + std::to_string(lda) + " stride " +
                            std::to_string(stride_k) + (with_bias ? " bias" : "") + (accumulate ? " accumulate" : "");

  // The expected sums: the chain of multiply-adds in k order, and a double sum with its size.
  std::vector<float> chain(rows * n);
  std::vector<double> exact(rows * n), magnitude(rows * n);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < n; ++c) {
      float acc = with_bias ? bias[c] : 0.f;
      if (accumulate) acc = acc + initial[r * n + c];
      double sum = acc, size = std::fabs(sum);
      for (int64_t j = 0; j < k; ++j) {
        const float x = a[r * lda + j], w = m_at(c, j);
        if (build.fused) {
          acc = std::fma(x, w, acc);
        } else {
          const volatile float product = x * w;  // rounded on its own, as an unfused multiply
          acc = acc + product;
        }
        sum += double(x) * double(w);
        size += std::fabs(double(x) * double(w));
      }
      chain[r * n + c] = acc;
      exact[r * n + c] = sum;
      magnitude[r * n + c] = size;
    }
  }

  const float sentinel = std::numeric_limits<float>::quiet_NaN();
  auto outside_untouched = [&](const std::vector<float>& out) {
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = n; c < ldo; ++c) {
        if (!std::isnan(out[r * ldo + c])) return false;
      }
    }
    for (size_t i = rows * ldo; i < out.size(); ++i) {
      if (!std::isnan(out[i])) return false;
    }
    return true;
  };

  // An output buffer (NaN around the output; with accumulate, the output holds `initial`), and the
  // check that a product wrote every chain of multiply-adds bit for bit and nothing else.
  auto fresh_output = [&] {
    std::vector<float> out(rows * ldo + 2 * ldo, sentinel);
    if (accumulate) {
      for (int64_t r = 0; r < rows; ++r) std::memcpy(&out[r * ldo], &initial[r * n], n * sizeof(float));
    }
    return out;
  };
  auto check_chains = [&](const char* product, const std::vector<float>& out) {
    ++tally.cases;
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < n; ++c) {
        if (!same_bits(out[r * ldo + c], chain[r * n + c])) {
          tally.fail(shape + ": " + product + " (" + std::to_string(r) + ", " + std::to_string(c) + ") = " +
                     std::to_string(out[r * ldo + c]) + ", the chain of multiply-adds gives " +
                     std::to_string(chain[r * n + c]));
          r = rows;
          break;
        }
      }
    }
    if (!outside_untouched(out)) tally.fail(shape + ": " + product + " wrote outside its output");
  };

  // Packed: bit for bit.
  std::vector<float> panels(PackedMatrix::floats_needed(n, k) + 1);
  const PackedMatrix packed = build.pack(m_rows.data(), n, k, stride_k, panels.data());
  std::vector<float> out = fresh_output();
  build.packed(a.data(), rows, lda, packed, b, out.data(), ldo, accumulate);
  check_chains("gemm_packed", out);

  // By columns: the same chains, bit for bit. M^T's rows (M's columns) in their own buffers of
  // exactly n floats each: a read past a column's end is one past its buffer, which this check built
  // with AddressSanitizer reports.
  std::vector<std::vector<float>> column_storage(k, std::vector<float>(n));
  std::vector<const float*> columns(k);
  for (int64_t j = 0; j < k; ++j) {
    for (int64_t i = 0; i < n; ++i) column_storage[j][i] = m_at(i, j);
    columns[j] = column_storage[j].data();
  }
  std::vector<float> by_columns = fresh_output();
  build.columns(a.data(), rows, lda, ColumnsMatrix{columns.data(), n, k}, b, by_columns.data(), ldo, accumulate);
  check_chains("gemm_columns", by_columns);

  // In place (rows of M contiguous, so only for stride 1; the engine uses it for a few rows).
  if (stride_k != 1 || rows > kRowsGemmMaxRows || accumulate) return;
  std::vector<float> in_place(rows * ldo + 2 * ldo, sentinel);
  const RowsMatrix rows_matrix{m_rows.data(), n, k};
  build.rows(a.data(), rows, lda, rows_matrix, b, in_place.data(), ldo);
  ++tally.cases;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < n; ++c) {
      const double error = std::fabs(in_place[r * ldo + c] - exact[r * n + c]);
      if (!(error <= 1e-5 * magnitude[r * n + c] + 1e-30)) {
        tally.fail(shape + ": gemm_rows (" + std::to_string(r) + ", " + std::to_string(c) + ") off by " +
                   std::to_string(error));
        r = rows;
        break;
      }
    }
  }
  if (!outside_untouched(in_place)) tally.fail(shape + ": gemm_rows wrote outside its output");

  // In place from 16-bit rows: bit for bit gemm_rows on their float values. bfloat16: M's rows
  // truncated to their high halves (any bfloat16 will do); float16: random bits of every class
  // (normal, subnormal, zero, a few infinities and NaNs), valued independently (ldexp).
  for (const Float16Kind kind : {Float16Kind::bfloat16, Float16Kind::float16}) {
    std::uniform_int_distribution<int> exponent(0, 31), mantissa(0, 1023), sign(0, 1);
    std::vector<uint16_t> halves(n * k);
    std::vector<float> widened(n * k);
    std::vector<const uint16_t*> half_rows(n);
    std::vector<const float*> widened_rows(n);
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < k; ++j) {
        uint16_t half;
        float value;
        if (kind == Float16Kind::bfloat16) {
          uint32_t bits;
          std::memcpy(&bits, &m_rows[i][j], sizeof(bits));
          half = static_cast<uint16_t>(bits >> 16);
          bits &= 0xffff0000u;
          std::memcpy(&value, &bits, sizeof(bits));
        } else {
          int e = exponent(gen);
          if (e == 31 && mantissa(gen) > 8) e = 15;  // keep infinities and NaNs rare (~1 in 3600)
          const int m = mantissa(gen);
          half = static_cast<uint16_t>((sign(gen) << 15) | (e << 10) | m);
          value = e == 0 ? std::ldexp(float(m), -24)
                  : e < 31 ? std::ldexp(float(1024 + m), e - 25)
                  : m == 0 ? std::numeric_limits<float>::infinity()
                           : std::numeric_limits<float>::quiet_NaN();
          if (half & 0x8000) value = -value;
        }
        halves[i * k + j] = half;
        widened[i * k + j] = value;
      }
      half_rows[i] = halves.data() + i * k;
      widened_rows[i] = widened.data() + i * k;
    }
    const char* kind_name = kind == Float16Kind::bfloat16 ? "bfloat16" : "float16";
    std::vector<float> from_floats(rows * ldo + 2 * ldo, sentinel), from_halves(rows * ldo + 2 * ldo, sentinel);
    build.rows(a.data(), rows, lda, RowsMatrix{widened_rows.data(), n, k}, b, from_floats.data(), ldo);
    build.rows_16(a.data(), rows, lda, Rows16Matrix{half_rows.data(), n, k, kind}, b, from_halves.data(), ldo);
    ++tally.cases;
    for (size_t i = 0; i < from_floats.size(); ++i) {
      const bool both_nan = std::isnan(from_floats[i]) && std::isnan(from_halves[i]);  // or both untouched
      if (!both_nan && !same_bits(from_floats[i], from_halves[i])) {
        tally.fail(shape + ": gemm_rows_16 (" + kind_name + ") differs from gemm_rows on the widened rows at " +
                   std::to_string(i));
        break;
      }
    }
  }
}

// pack_columns against pack_matrix of the same M (its columns given as rows of M^T), panel by
// panel in two halves as two team members pack them; transpose element by element.
void check_packing(const Build& build, int64_t n, int64_t k, std::mt19937& gen, Tally& tally) {
  std::normal_distribution<float> normal;
  const int64_t ld = n + 3;  // M^T: k x n, row j is column j of M
  std::vector<float> mt(k * ld);
  for (auto& v : mt) v = normal(gen);
  std::vector<const float*> columns(k), rows(n);
  for (int64_t j = 0; j < k; ++j) columns[j] = mt.data() + j * ld;
  for (int64_t i = 0; i < n; ++i) rows[i] = mt.data() + i;
  std::vector<float> by_rows(PackedMatrix::floats_needed(n, k)), by_columns(by_rows.size(), 1.f);
  build.pack(rows.data(), n, k, ld, by_rows.data());
  const int64_t panels = panel_count(n);
  build.pack_columns(columns.data(), n, k, by_columns.data(), 0, panels / 2);
  const PackedMatrix packed = build.pack_columns(columns.data(), n, k, by_columns.data(), panels / 2, panels);
  ++tally.cases;
  if (packed.n != n || packed.k != k || packed.panels != by_columns.data() ||
      (!by_rows.empty() && std::memcmp(by_rows.data(), by_columns.data(), by_rows.size() * sizeof(float)) != 0)) {
    tally.fail(std::string(build.name) + " pack_columns n " + std::to_string(n) + " k " + std::to_string(k) +
               " differs from pack_matrix of the same matrix");
  }
  // transpose: dst (n x k) = (M^T)^T, in a wider buffer whose padding must stay untouched.
  const int64_t ld_dst = k + 5;
  std::vector<float> dst(n * ld_dst, std::numeric_limits<float>::quiet_NaN());
  build.transpose(mt.data(), k, n, ld, dst.data(), ld_dst);
  ++tally.cases;
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < ld_dst; ++j) {
      const float got = dst[i * ld_dst + j];
      if (j < k ? !same_bits(got, mt[j * ld + i]) : !std::isnan(got)) {
        tally.fail(std::string(build.name) + " transpose of " + std::to_string(k) + " x " + std::to_string(n) +
                   " wrong at (" + std::to_string(i) + ", " + std::to_string(j) + ")");
        return;
      }
    }
  }
}

// add_row_sums: each row's sum added to what was there, within float rounding of a double sum; the
// padding past cols and the sums past rows untouched.
void check_row_sums(const Build& build, int64_t rows, int64_t cols, std::mt19937& gen, Tally& tally) {
  std::normal_distribution<float> normal;
  const int64_t lda = cols + 5;
  std::vector<float> a(rows * lda), sums(rows + 1);
  for (auto& v : a) v = normal(gen);
  for (auto& v : sums) v = normal(gen);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = cols; c < lda; ++c) a[r * lda + c] = std::numeric_limits<float>::quiet_NaN();
  }
  const std::vector<float> before = sums;
  build.add_row_sums(a.data(), rows, cols, lda, sums.data());
  ++tally.cases;
  for (int64_t r = 0; r < rows; ++r) {
    double exact = before[r], size = std::fabs(exact);
    for (int64_t c = 0; c < cols; ++c) {
      exact += a[r * lda + c];
      size += std::fabs(a[r * lda + c]);
    }
    if (!(std::fabs(sums[r] - exact) <= 1e-5 * size + 1e-30)) {
      tally.fail(std::string(build.name) + " add_row_sums of " + std::to_string(rows) + " x " + std::to_string(cols) +
                 " off at row " + std::to_string(r));
      return;
    }
  }
  if (!same_bits(sums[rows], before[rows])) tally.fail(std::string(build.name) + " add_row_sums wrote past its rows");
}

Tally check_build(const Build& build) {
  Tally tally;
  std::mt19937 gen(12345);
  for (int64_t rows = 0; rows <= 30; ++rows) {
    for (const int64_t n : {1, 5, 16, 17, 33, 100}) {
      for (const int64_t k : {0, 1, 7, 8, 37, 130}) {
        for (const int64_t stride_k : {1, 2}) {
          check_case(build, rows, n, k, /*with_bias=*/(rows + n + k) % 2 == 0, stride_k, gen, tally);
        }
        check_case(build, rows, n, k, /*with_bias=*/(rows + n) % 2 == 0, 1, gen, tally, 0, /*accumulate=*/true);
      }
    }
  }
  // Rows a multiple of 4 KiB apart (the product copies them further apart first, at more than 8 rows
  // a block), with k up to the whole row.
  for (const int64_t rows : {5, 9, 12, 14, 23, 30}) {
    for (const int64_t k : {37, 1008, 1024}) {
      for (const int64_t lda : {1024, 2048}) {
        check_case(build, rows, 33, k, /*with_bias=*/rows % 2 == 0, 1, gen, tally, lda, /*accumulate=*/k == 1008);
      }
    }
  }
  for (const int64_t n : {1, 8, 15, 16, 17, 40}) {
    for (const int64_t k : {0, 1, 7, 8, 9, 24, 31}) check_packing(build, n, k, gen, tally);
  }
  for (const int64_t rows : {0, 1, 3}) {
    for (const int64_t cols : {0, 1, 7, 8, 31, 32, 33, 100}) check_row_sums(build, rows, cols, gen, tally);
  }
  return tally;
}

}  // namespace

int main() {
  std::vector<Build> builds = {{"baseline", false, &baseline::pack_matrix, &baseline::gemm_packed,
                                &baseline::gemm_columns, &baseline::gemm_rows, &baseline::gemm_rows_16,
                                &baseline::pack_columns, &baseline::transpose, &baseline::add_row_sums}};
#if defined(__x86_64__) || defined(__i386__)
#if defined(RNNATTN_CHECK_AVX2)
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    builds.push_back({"avx2", true, &avx2::pack_matrix, &avx2::gemm_packed, &avx2::gemm_columns, &avx2::gemm_rows,
                      &avx2::gemm_rows_16, &avx2::pack_columns, &avx2::transpose, &avx2::add_row_sums});
  } else {
    std::printf("avx2: not run (no AVX2, FMA and F16C)\n");
  }
#endif
#if defined(RNNATTN_CHECK_AVX512)
  if (__builtin_cpu_supports("avx512f")) {
    // The library packs, transposes, sums rows and reads in place with the AVX2 build here
    // (packed_gemm_baseline.cpp).
    builds.push_back({"avx512", true, &avx2::pack_matrix, &avx512::gemm_packed, &avx512::gemm_columns,
                      &avx2::gemm_rows, &avx2::gemm_rows_16, &avx2::pack_columns, &avx2::transpose,
                      &avx2::add_row_sums});
  } else {
    std::printf("avx512: not run (no AVX-512F)\n");
  }
#endif
#endif
  int64_t mismatched = 0;
  for (const Build& build : builds) {
    const Tally tally = check_build(build);
    std::printf("%s: %lld cases, %lld mismatched\n", build.name, static_cast<long long>(tally.cases),
                static_cast<long long>(tally.mismatched));
    mismatched += tally.mismatched;
  }
  return mismatched == 0 ? 0 : 1;
}
