#include "engine/unit_blocks.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>

#include "engine/usable_cpus.h"

namespace rnnattn {
namespace {

// Blocks narrower than this (in units) are not worth a thread: the GEMM per block gets too thin.
constexpr int64_t kMinUnitsPerBlock = 32;
// Nor ranges of fewer batch rows than this.
constexpr int64_t kMinRowsPerBlock = 8;
// Split by rows, every thread reads all of the step's weights (W_hh, W_ih, the attention cell's
// W_q, W_k, W_v and W_c) each step; by units, its block's share. Where the units cannot use every
// thread (fewer than 32 a thread) and the rows can, rows: a 32-unit LSTM or GRU at batch 64-256 ran
// its forward 1.6-1.7x and its backward 1.2-1.3x faster on two threads by rows than on one. For as
// many threads either way, the backward by rows up to this many recurrent weights (2 MiB of floats:
// a 362-unit LSTM's, a 256-unit attention LSTM's with 192 rows of W_q, W_k, W_v), the forward by
// units: on a 2-core x86 CPU the backward of 32- to 256-unit layers at batch 16-256 took 4-16% less
// time by rows, that of a 256-unit attention LSTM (4 heads of 16, window 128) at batch 16 4% less
// (10-25% while one of the cores ran slow: by units every step waits for the slower thread), of a
// 320-unit LSTM at batch 16 and 64 5-7% less; the forward the same time for plain layers (a
// 512-unit LSTM's 5% more), 8-11% more for attention cells of 64 and 128 units, whose weights by
// rows no longer fit a core's cache.
constexpr int64_t kMaxRowSplitWeights = int64_t{1} << 19;

// A thread must also get enough of each step's recurrent product (multiply-adds: weight floats times
// batch rows) to pay for the barrier it adds to every step, and a one-step call enough to pay for
// starting the threads at all: below that, fewer threads are faster. Measured on a 2-core x86 CPU
// (T=100, alternating processes): the forward of a 64-unit Elman RNN at batch 1 (4,096 per step)
// ran as fast on two threads as on one, at batch 2 1.3x faster; a 64-unit LSTM or GRU or a
// 128-unit RNN at batch 1 (12-16 K) 1.5x faster. The backward, whose threads also add up each
// other's shares of dh, gained nothing up to 16 K (0.9-1.05x) and 1.1x from 64 K. One step of a
// 128-unit LSTM at batch 1 (64 K) was 8% faster on one thread, one of a 256-unit LSTM 11% slower.
// RNNATTN_CPU_MIN_BLOCK_WORK overrides the backward's bound; the forward's is a quarter of it and a
// one-step call's 4 times it.
int64_t min_block_work() {
  static const int64_t value = [] {
    const char* text = std::getenv("RNNATTN_CPU_MIN_BLOCK_WORK");
    const long long parsed = text != nullptr ? std::atoll(text) : 0;
    return parsed > 0 ? static_cast<int64_t>(std::min(parsed, 1LL << 40)) : int64_t{16384};  // bounded: * 4 fits
  }();
  return value;
}
int64_t min_thread_work(int64_t steps, LoopPass pass) {
  if (steps == 1) return 4 * min_block_work();
  return pass == LoopPass::forward ? std::max<int64_t>(1, min_block_work() / 4) : min_block_work();
}

at::Tensor to_index(const std::vector<int64_t>& order) {
  return at::tensor(order, at::TensorOptions().dtype(at::kLong));
}

at::Tensor inverse_of(const at::Tensor& order) {
  return at::empty_like(order).index_copy_(0, order, at::arange(order.numel(), at::kLong));
}

// The blocks of `count` threads, their row orders included (the part worth caching).
UnitBlocks blocks_for(int gates, int64_t hidden, int64_t groups, int64_t heads, int64_t head_dim, int64_t count) {
  UnitBlocks blocks;
  blocks.gates = gates;
  blocks.hidden = hidden;
  blocks.groups = groups;
  blocks.head_dim = head_dim;
  for (int64_t c = 0; c < count; ++c) {
    // Block edges on multiples of 8 units keep the vectorized loops aligned.
    blocks.begin.push_back(c == 0 ? 0 : (hidden * c / count) / 8 * 8);
    blocks.head_begin.push_back(heads * c / count);
  }
  blocks.begin.push_back(hidden);
  blocks.head_begin.push_back(heads);
  blocks.rec_begin.push_back(0);
  for (int64_t c = 0; c < count; ++c) {
    blocks.rec_begin.push_back(blocks.rec_begin.back() + blocks.rows(c) + groups * blocks.cols(c));
  }
  if (count > 1) {
    const int64_t gate_rows = gates * hidden, width = heads * head_dim;
    std::vector<int64_t> order, rec_order;
    for (int64_t c = 0; c < count; ++c) {
      for (int g = 0; g < gates; ++g) {
        for (int64_t j = blocks.first(c); j < blocks.first(c) + blocks.width(c); ++j) order.push_back(g * hidden + j);
      }
    }
    for (int64_t c = 0; c < count; ++c) {
      rec_order.insert(rec_order.end(), order.begin() + blocks.row0(c), order.begin() + blocks.row0(c) + blocks.rows(c));
      for (int64_t a = 0; a < groups; ++a) {
        for (int64_t d = blocks.col0(c); d < blocks.col0(c) + blocks.cols(c); ++d) {
          rec_order.push_back(gate_rows + a * width + d);
        }
      }
    }
    blocks.order = to_index(order);
    blocks.inverse = inverse_of(blocks.order);
    blocks.rec_order = groups > 0 ? to_index(rec_order) : blocks.order;
    blocks.rec_inverse = groups > 0 ? inverse_of(blocks.rec_order) : blocks.inverse;
  }
  return blocks;
}

}  // namespace

int64_t cpu_threads_for(int64_t weights, int64_t rows, int64_t steps, LoopPass pass) {
  if (at::in_parallel_region()) return 1;
  // (Both factors are bounded by the sizes of real tensors; the product saturates rather than wraps.)
  const int64_t work = rows > 0 && weights > INT64_MAX / rows ? INT64_MAX : weights * std::max<int64_t>(rows, 1);
  // No more threads than CPUs to run them (usable_cpus.h): the barrier between phases spins.
  return std::max<int64_t>(
      1, std::min<int64_t>({at::get_num_threads(), usable_cpus(), work / min_thread_work(steps, pass)}));
}

LoopSplit cpu_loop_split(int gates, int64_t hidden, int64_t state_width, int64_t rows, int64_t steps, LoopPass pass,
                         const at::Tensor& like, int64_t groups, int64_t heads, int64_t head_dim,
                         bool rows_independent) {
  LoopSplit split;
  if (!like.is_cpu()) return split;
  const int64_t weights = (gates * hidden + groups * heads * head_dim) * std::max<int64_t>(1, state_width);
  const int64_t threads = cpu_threads_for(weights, rows, steps, pass);
  split.unit_blocks = std::max<int64_t>(1, std::min(threads, hidden / kMinUnitsPerBlock));
  const int64_t row_blocks = std::min(threads, rows / kMinRowsPerBlock);
  const bool tie_to_rows = pass == LoopPass::backward && weights <= kMaxRowSplitWeights;
  if (rows_independent && row_blocks > 1 &&
      (row_blocks > split.unit_blocks || (row_blocks == split.unit_blocks && tie_to_rows))) {
    split.unit_blocks = 1;
    split.row_blocks = row_blocks;
  }
  return split;
}

UnitBlocks make_unit_blocks(int gates, int64_t hidden, int64_t count, int64_t groups, int64_t heads,
                            int64_t head_dim) {
  // The row orders cost several small tensor ops, as much as a whole one-step call of a small layer:
  // each thread keeps the blocks of its last few shapes (they are never written once made).
  struct Cached {
    std::array<int64_t, 6> key;
    UnitBlocks blocks;
  };
  thread_local std::vector<Cached> cache;
  const std::array<int64_t, 6> key{gates, hidden, groups, heads, head_dim, count};
  for (const Cached& entry : cache) {
    if (entry.key == key) return entry.blocks;
  }
  constexpr size_t kCachedShapes = 8;
  if (cache.size() == kCachedShapes) cache.erase(cache.begin());
  cache.push_back({key, blocks_for(gates, hidden, groups, heads, head_dim, count)});
  return cache.back().blocks;
}

}  // namespace rnnattn
