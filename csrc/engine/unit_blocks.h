// How the hidden units (and the attention heads) are split into blocks, one per CPU thread, and the
// row orders that make each block's rows of the weights and projections contiguous.
//
// On the CPU every thread keeps its own slice of the recurrent weights hot in its cache for the whole
// sequence and runs its block's GEMM and pointwise pass with no synchronisation in between. CUDA
// uses a single block (and the plain torch.nn row order).
//
// Two row orders:
//   gate rows (G*H: W_ih, W_c, the input projection): block c holds gate g of its units, g = 0..G-1;
//   recurrent-side rows (G*H + groups*D: W_hh stacked with the attention cell's W_q[, W_k, W_v]):
//     block c holds its gate rows, then for each group the rows of its heads.
// Without attention (groups = 0) the two orders are the same.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <utility>
#include <vector>

#include "engine/thread_team.h"

namespace rnnattn {

struct UnitBlocks {
  int64_t gates = 1, hidden = 0;
  int64_t groups = 0, head_dim = 0;  // attention rows: `groups` groups of D = heads * head_dim rows
  std::vector<int64_t> begin;        // block c covers units [begin[c], begin[c + 1])
  std::vector<int64_t> head_begin;   // and heads [head_begin[c], head_begin[c + 1])
  std::vector<int64_t> rec_begin;    // and recurrent-side rows [rec_begin[c], rec_begin[c + 1])
  at::Tensor order, inverse;         // gate rows: permuted row p is torch.nn row order[p]; undefined if identity
  at::Tensor rec_order, rec_inverse; // recurrent-side rows, likewise

  int64_t count() const { return static_cast<int64_t>(begin.size()) - 1; }
  int64_t first(int64_t c) const { return begin[c]; }
  int64_t width(int64_t c) const { return begin[c + 1] - begin[c]; }
  // Gate rows of block c: [row0, row0 + rows).
  int64_t row0(int64_t c) const { return gates * begin[c]; }
  int64_t rows(int64_t c) const { return gates * width(c); }
  // Attention columns (of D) of block c's heads: [col0, col0 + cols).
  int64_t col0(int64_t c) const { return head_begin[c] * head_dim; }
  int64_t cols(int64_t c) const { return (head_begin[c + 1] - head_begin[c]) * head_dim; }
  // Recurrent-side rows of block c: rows(c) gate rows, then groups * cols(c) attention rows.
  int64_t rec_row0(int64_t c) const { return rec_begin[c]; }
  int64_t rec_rows(int64_t c) const { return rec_begin[c + 1] - rec_begin[c]; }
  int64_t rec_total() const { return rec_begin.back(); }

  at::Tensor unpermute_rows(const at::Tensor& t) const { return inverse.defined() ? t.index_select(0, inverse) : t; }
  at::Tensor unpermute_rec_rows(const at::Tensor& t) const {
    return rec_inverse.defined() ? t.index_select(0, rec_inverse) : t;
  }
};

// Calls fn(offset, row, count) for each run of the rows [first, first + count) of a row order
// (UnitBlocks::order or rec_order, on the CPU; undefined: the identity) that are consecutive rows
// in torch.nn order: rows first + offset ... of the order are torch.nn rows row ..., count of them.
// A block's gate rows are one run per gate.
template <typename Fn>
void for_each_torch_nn_run(const at::Tensor& order, int64_t first, int64_t count, Fn&& fn) {
  if (!order.defined()) {
    if (count > 0) fn(int64_t{0}, first, count);
    return;
  }
  const int64_t* row = order.const_data_ptr<int64_t>() + first;
  for (int64_t begin = 0, end = 0; begin < count; begin = end) {
    for (end = begin + 1; end < count && row[end] == row[end - 1] + 1;) ++end;
    fn(begin, row[begin], end - begin);
  }
}

// Which pass of the time loop a thread count is for: they differ in what a thread costs them.
enum class LoopPass { forward, backward };

// How many CPU threads a call of `steps` steps should run whose every step multiplies `rows` rows
// (the batch) by `weights` floats of weights: one per CPU (at most torch's thread count) while each
// thread's share of a step pays for the barrier it adds (and, for a one-step call, for starting the
// threads); 1 inside a parallel region.
int64_t cpu_threads_for(int64_t weights, int64_t rows, int64_t steps, LoopPass pass);

// How a CPU time loop shares each step among its threads: blocks of hidden units (each thread its
// block's rows of the weights, hot in its cache, for every batch row; the threads meet between a
// step's phases), or ranges of batch rows (each thread every unit of its rows, rows being
// independent; they meet only for the backward's weight gradients, once a chunk of steps). One of
// the two counts is 1.
struct LoopSplit {
  int64_t unit_blocks = 1, row_blocks = 1;
  int64_t threads() const { return unit_blocks > row_blocks ? unit_blocks : row_blocks; }
  // Thread c's unit block, and its batch rows [begin, end).
  int64_t unit_block(int64_t c) const { return row_blocks > 1 ? 0 : c; }
  std::pair<int64_t, int64_t> rows(int64_t c, int64_t batch) const {
    return row_blocks > 1 ? even_share(batch, c, row_blocks) : std::pair<int64_t, int64_t>(0, batch);
  }
};

// The split of a `pass` of `steps` steps over `rows` batch rows of a layer of `gates` gates of
// `hidden` units whose state is `state_width` wide (and, for the attention cell, `groups` groups of
// `heads` heads of `head_dim` rows): as many threads as cpu_threads_for gives, over blocks of at
// least 32 units, or over ranges of at least 8 batch rows where `rows_independent` (no phase of a
// step mixes rows) and the rows give more threads than the units, or (the backward, for recurrent
// weights up to 2 MiB of floats: a 362-unit LSTM's) as many. One thread off the CPU.
LoopSplit cpu_loop_split(int gates, int64_t hidden, int64_t state_width, int64_t rows, int64_t steps, LoopPass pass,
                         const at::Tensor& like, int64_t groups, int64_t heads, int64_t head_dim,
                         bool rows_independent);

// `count` blocks of `hidden` units of `gates` gates (and, for the attention cell, `groups` groups
// of `heads` heads of `head_dim` rows), with their row orders.
UnitBlocks make_unit_blocks(int gates, int64_t hidden, int64_t count, int64_t groups = 0, int64_t heads = 0,
                            int64_t head_dim = 0);

}  // namespace rnnattn
