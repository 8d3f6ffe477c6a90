// The bfloat16 GEMM (csrc/engine/cpu/packed_gemm_bf16.{h,cpp}) against the sums it must compute, on
// the host, by tests/test_cpu_gemm.py, which links this file with the library's source compiled with
// the library's flags (RNNATTN_CHECK_HARDWARE: its AVX512-BF16 kernel, run where the CPU has it) or
// without them (its portable loop). Each output element is one chain from bias + out (with accumulate)
// or the bias (or zero), adding the products of bfloat16(a) and bfloat16(M) pair by pair: the
// hardware adds a pair's odd product first, then its even one (the instruction's definition), the
// portable loop k in order; every product is exact in float, so each chain is compared bit for bit.
// Inputs stay far from denormals (which the instruction flushes). Shapes: 0-30 rows (every block
// size, one and several blocks), partial panels, odd k (a zero-padded last pair), padded leading
// dimensions, rows of M through a shuffled table and with a column stride, or M packed from a shuffled
// table of its columns in two panel ranges, bias or none, accumulate; nothing outside the output's rows
// and columns, or past the panels, may change.
#include "engine/cpu/packed_gemm_bf16.h"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

using namespace rnnattn::cpu;

namespace {

float widen(uint16_t half) {
  const uint32_t bits = static_cast<uint32_t>(half) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

float bf16(float x) { return widen(to_bfloat16(x)); }

struct Tally {
  int64_t cases = 0, mismatched = 0;
};

// M packed from its rows (pack_matrix_bf16, rows through a shuffled table, with a column stride) or
// from its columns (pack_columns_bf16, columns through a shuffled table, packed in two panel ranges as
// two team members would).
enum class Packing { rows, columns };

void check_case(bool hardware, int64_t rows, int64_t n, int64_t k, int64_t stride_k, bool with_bias, bool accumulate,
                std::mt19937& gen, Tally& tally, Packing packing = Packing::rows) {
  std::uniform_real_distribution<float> value(-2.f, 2.f);
  const int64_t lda = k + 3, ldo = n + 5;
  std::vector<float> a(rows * lda + 1), storage(n * k * stride_k + 1), bias(n), out(rows * ldo + 7);
  for (float& v : a) v = value(gen);
  for (float& v : storage) v = value(gen);
  for (float& v : bias) v = value(gen);
  for (float& v : out) v = value(gen);
  std::vector<uint32_t> panels(PackedBf16Matrix::words_needed(n, k) + 1, 0xdeadbeefu);
  PackedBf16Matrix m;
  std::vector<const float*> row_of(n), column_of(k);
  if (packing == Packing::rows) {
    std::vector<int64_t> order(n);
    for (int64_t i = 0; i < n; ++i) order[i] = i;
    std::shuffle(order.begin(), order.end(), gen);
    for (int64_t i = 0; i < n; ++i) row_of[i] = storage.data() + order[i] * k * stride_k;
    m = pack_matrix_bf16(row_of.data(), n, k, stride_k, panels.data());
  } else {
    // Column j: n floats (of the storage's n * k) somewhere in it, columns n + 1 floats apart.
    storage.resize(k * (n + 1) + 1);
    for (float& v : storage) v = value(gen);
    std::vector<int64_t> order(k);
    for (int64_t j = 0; j < k; ++j) order[j] = j;
    std::shuffle(order.begin(), order.end(), gen);
    for (int64_t j = 0; j < k; ++j) column_of[j] = storage.data() + order[j] * (n + 1);
    const int64_t middle = panel_count(n) / 2;
    pack_columns_bf16(column_of.data(), n, k, panels.data(), middle, panel_count(n));
    m = pack_columns_bf16(column_of.data(), n, k, panels.data(), 0, middle);
  }
  auto element = [&](int64_t c, int64_t j) {
    return packing == Packing::rows ? row_of[c][j * stride_k] : column_of[j][c];
  };
  if (panels.back() != 0xdeadbeefu) ++tally.mismatched;  // nothing past the panels written
  const std::vector<float> before = out;
  gemm_packed_bf16(a.data(), rows, lda, m, with_bias ? bias.data() : nullptr, out.data(), ldo, accumulate);
  ++tally.cases;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < ldo; ++c) {
      const size_t at = r * ldo + c;
      if (c >= n) {
        if (std::memcmp(&out[at], &before[at], sizeof(float)) != 0) ++tally.mismatched;
        continue;
      }
      float sum = with_bias ? bias[c] : 0.f;
      if (accumulate) sum = sum + before[at];
      auto product = [&](int64_t j) { return j < k ? bf16(a[r * lda + j]) * bf16(element(c, j)) : 0.f; };
      for (int64_t j = 0; j < k; j += 2) {
        if (hardware) {
          sum = sum + product(j + 1);
          sum = sum + product(j);
        } else {
          sum = sum + product(j);
          if (j + 1 < k) sum = sum + product(j + 1);
        }
      }
      if (std::memcmp(&out[at], &sum, sizeof(float)) != 0) {
        if (tally.mismatched < 5) {
          std::printf("mismatch rows %lld n %lld k %lld at (%lld, %lld): %.9g expected %.9g\n",
                      static_cast<long long>(rows), static_cast<long long>(n), static_cast<long long>(k),
                      static_cast<long long>(r), static_cast<long long>(c), out[at], sum);
        }
        ++tally.mismatched;
      }
    }
  }
  if (std::memcmp(&out[rows * ldo], &before[rows * ldo], (out.size() - rows * ldo) * sizeof(float)) != 0) {
    ++tally.mismatched;
  }
}

}  // namespace

int main() {
#if defined(RNNATTN_CHECK_HARDWARE)
  const bool hardware = true;
  if (!__builtin_cpu_supports("avx512bf16")) {
    std::printf("bf16: not run (no AVX512-BF16)\n");
    return 0;
  }
#else
  const bool hardware = false;
#endif
  std::mt19937 gen(7);
  Tally tally;
  for (int64_t rows = 0; rows <= 30; ++rows) {
    for (const int64_t n : {1, 16, 17, 32, 45, 64}) {
      for (const int64_t k : {0, 1, 2, 7, 16, 33}) {
        check_case(hardware, rows, n, k, 1, rows % 2 == 0, rows % 3 == 0, gen, tally);
      }
    }
  }
  for (const int64_t rows : {1, 5, 12, 13, 25}) {
    for (const int64_t n : {1, 15, 16, 33, 64}) {
      for (const int64_t k : {1, 2, 9, 32, 47}) {
        check_case(hardware, rows, n, k, 1, rows % 2 == 0, n % 2 == 0, gen, tally, Packing::columns);
      }
    }
  }
  check_case(hardware, 13, 40, 21, 3, true, true, gen, tally);  // a column stride
  check_case(hardware, 64, 96, 256, 1, true, false, gen, tally);
  std::printf("bf16 %s: %lld cases, %lld mismatched\n", hardware ? "avx512" : "portable",
              static_cast<long long>(tally.cases), static_cast<long long>(tally.mismatched));
  return tally.mismatched == 0 ? 0 : 1;
}
