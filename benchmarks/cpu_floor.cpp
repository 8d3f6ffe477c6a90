// What this CPU's caches and FMA units allow the per-step products of a recurrent layer, measured with
// the library's own GEMM kernels (csrc/engine/cpu/packed_gemm*): the bound the CPU times of the suite
// are judged against. Built and run by benchmarks/cpu_floor.py, which says what each case stands for.
//
//   cpu_floor <avx2|avx512> <threads> <n> <k> <rows> <packed|in_place>
//
// Each thread multiplies `rows` rows by its own n x k matrix (as each of the engine's threads owns its
// slice of the weights), 500 times in a row; prints the best of 10 such runs of the slowest thread as
// "us <per product> GBps <weights read per second> GFLOPs <per thread>".
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#include "engine/cpu/packed_gemm.h"

using namespace rnnattn::cpu;

namespace {

struct Kernels {
  PackedMatrix (*pack)(const float* const*, int64_t, int64_t, int64_t, float*);
  PackedGemmFn packed;
  RowsGemmFn in_place;
};

double run_thread(const Kernels& kernels, int64_t n, int64_t k, int64_t rows, bool packed, std::atomic<int>& ready,
                  int threads) {
  std::vector<float> weights(n * k), a(rows * k), out(rows * n), bias(n, 0.f);
  unsigned seed = 1;
  for (float& v : weights) v = static_cast<float>(rand_r(&seed)) / RAND_MAX - 0.5f;
  for (float& v : a) v = static_cast<float>(rand_r(&seed)) / RAND_MAX - 0.5f;
  std::vector<const float*> row_addresses(n);
  for (int64_t i = 0; i < n; ++i) row_addresses[i] = weights.data() + i * k;
  std::vector<float> panels(PackedMatrix::floats_needed(n, k));
  const PackedMatrix matrix = kernels.pack(row_addresses.data(), n, k, 1, panels.data());
  const RowsMatrix in_place{row_addresses.data(), n, k};
  auto product = [&] {
    if (packed) kernels.packed(a.data(), rows, k, matrix, bias.data(), out.data(), n, /*accumulate=*/false);
    else kernels.in_place(a.data(), rows, k, in_place, bias.data(), out.data(), n);
    a[0] += out[0] * 1e-30f;  // each product depends on the last, as a step's on the step before
  };
  for (int i = 0; i < 200; ++i) product();
  ready.fetch_add(1);
  while (ready.load() < threads) {
  }
  double best = 1e30;
  for (int run = 0; run < 10; ++run) {
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < 500; ++i) product();
    const std::chrono::duration<double, std::micro> elapsed = std::chrono::steady_clock::now() - start;
    best = std::min(best, elapsed.count() / 500);
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 7) {
    std::fprintf(stderr, "usage: cpu_floor <avx2|avx512> <threads> <n> <k> <rows> <packed|in_place>\n");
    return 2;
  }
  const bool avx512 = std::strcmp(argv[1], "avx512") == 0;
  const Kernels kernels = avx512 ? Kernels{avx512::pack_matrix, avx512::gemm_packed, avx512::gemm_rows}
                                 : Kernels{avx2::pack_matrix, avx2::gemm_packed, avx2::gemm_rows};
  const int threads = std::atoi(argv[2]);
  const int64_t n = std::atoll(argv[3]), k = std::atoll(argv[4]), rows = std::atoll(argv[5]);
  const bool packed = std::strcmp(argv[6], "packed") == 0;
  if (threads < 1 || n < 1 || k < 1 || rows < 1) {
    std::fprintf(stderr, "cpu_floor: threads, n, k and rows must be positive\n");
    return 2;
  }
  std::vector<double> times(threads);
  std::atomic<int> ready{0};
  std::vector<std::thread> team;
  for (int t = 0; t < threads; ++t) {
    team.emplace_back([&, t] { times[t] = run_thread(kernels, n, k, rows, packed, ready, threads); });
  }
  for (auto& member : team) member.join();
  const double us = *std::max_element(times.begin(), times.end());
  std::printf("us %.3f GBps %.1f GFLOPs %.1f\n", us, n * k * 4 / us / 1e3, 2.0 * rows * n * k / us / 1e3);
  return 0;
}
