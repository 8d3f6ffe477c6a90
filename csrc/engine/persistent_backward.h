// The backward time loop as one CUDA kernel, the counterpart of persistent_forward.h: thread block c
// owns hidden units [c U, c U + U) and keeps their columns of W_hh in shared memory. Per step, last
// to first, it runs the cell's backward on its units (writing their gate gradients), and after a
// grid-wide barrier (every block's gate gradients of the step are complete) adds its units' part of
// dh_{t-1} = dg_t @ W_hh to the carried gradient. The weight, bias and input gradients are large
// products after the loop, as on the loop step by step.
//
// Like persistent_forward.h: one block's phases between barriers, free of CUDA, run on the host by
// tests/cpp/persistent_loop_check.cpp.
#pragma once
#include <cstdint>

#include "engine/persistent_forward.h"

namespace rnnattn {

template <typename T>
struct PersistentBackwardArgs {
  BackwardStepArgs<T> step;  // dstate (carried, updated in place), lengths, batch, hidden; dxg, and dhg
                             // for a cell with a separate recurrent-side gradient, at time 0 (row t*B + b)
  ForwardLayout<T> layout;   // where the training forward left its states and saved activations
  const T* grad_output;      // (T, B, H)
  const T* weight;           // W_hh (G*H, H), torch.nn's row order
  int64_t units;             // U, hidden units per thread block
  int64_t batch_tile;        // rows of the step's gate gradients staged in shared memory at a time
  int64_t parts;             // the product's sums over G*H split into this many parts (more threads)
};

// Shared memory of one block, in the accumulate type A: its W_hh columns (U rows of the padded G*H),
// a tile of gate-gradient rows, and the parts' partial sums.
template <class Cell, typename T>
int64_t persistent_backward_shared_bytes(int64_t hidden, int64_t units, int64_t batch_tile, int64_t parts) {
  using A = typename ScalarIO<T>::Acc;
  const int64_t width = persistent_padded_width(Cell::kGates * hidden), rows = persistent_tile_rows(batch_tile);
  return ((units + rows) * width + parts * rows * units) * int64_t(sizeof(A));
}

template <class Cell, typename T>
struct PersistentBackwardBlock {
  using IO = ScalarIO<T>;
  using A = typename IO::Acc;
  static constexpr int G = Cell::kGates;
  static constexpr int64_t NB = kPersistentRowsPerThread;

  const PersistentBackwardArgs<T>& args;
  int64_t first_unit, units;  // this block's units [first_unit, first_unit + units)
  int64_t width, tile_rows;   // padded G*H; rows of the staging tile
  const T* rec_grad;          // the recurrent-side gate gradients: dhg, or dxg where they are equal
  int64_t rec_stride;
  A* weights;                 // U x width: row u is column first_unit + u of W_hh
  A* staged;                  // tile_rows x width
  A* partials;                // parts x tile_rows x U

  RNNATTN_HD PersistentBackwardBlock(const PersistentBackwardArgs<T>& a, int64_t block, void* shared)
      : args(a) {
    const int64_t H = a.step.hidden;
    first_unit = block * a.units;
    units = H - first_unit < a.units ? H - first_unit : a.units;
    width = persistent_padded_width(G * H);
    tile_rows = persistent_tile_rows(a.batch_tile);
    const bool separate = a.step.dhg.ptr != nullptr;
    rec_grad = separate ? a.step.dhg.ptr : a.step.dxg.ptr;
    rec_stride = separate ? a.step.dhg.row_stride : a.step.dxg.row_stride;
    weights = static_cast<A*>(shared);
    staged = weights + a.units * width;
    partials = staged + tile_rows * width;
  }

  // Once: the block's columns of W_hh, as rows; missing units and the padding are zeros. Threads
  // next to each other read a row's units next to each other.
  RNNATTN_HD void load_weights(int64_t thread, int64_t threads) const {
    const int64_t H = args.step.hidden, U = args.units;
    for (int64_t i = thread; i < U * width; i += threads) {
      const int64_t r = i / U, u = i % U;
      weights[u * width + r] = r < G * H && u < units ? IO::load(args.weight[r * H + first_unit + u]) : A(0);
    }
  }

  // The cell's backward on this block's units of every row at step k.
  RNNATTN_HD void pointwise(int64_t k, int64_t thread, int64_t threads) const {
    BackwardStepArgs<T> a = args.step;
    args.layout.template fill<Cell::kStates>(a, k);
    const int64_t B = a.batch, H = a.hidden;
    a.grad_output = args.grad_output + a.time * B * H;
    a.dxg.ptr += a.time * B * a.dxg.row_stride + first_unit;
    if (a.dhg.ptr != nullptr) a.dhg.ptr += a.time * B * a.dhg.row_stride + first_unit;
    a.unit_begin = first_unit;
    a.unit_end = first_unit + units;
    for (int64_t i = thread; i < B * units; i += threads) {
      const int64_t b = i / units, j = first_unit + i % units;
      if (row_active(a, b)) {
        backward_unit<Cell, T>(a, b, j);
      } else {
        hold_backward_unit<Cell, T>(a, b, j);
      }
    }
  }

  // Rows [b0, b0 + n) of step k's recurrent-side gate gradients into the staging tile.
  RNNATTN_HD void stage_rows(int64_t k, int64_t b0, int64_t n, int64_t thread, int64_t threads) const {
    const int64_t GH = G * args.step.hidden;
    const T* source = rec_grad + (args.layout.time(k) * args.step.batch + b0) * rec_stride;
    for (int64_t i = thread; i < tile_rows * width; i += threads) {
      const int64_t b = i / width, r = i % width;
      staged[i] = b < n && r < GH ? IO::load(source[b * rec_stride + r]) : A(0);
    }
  }

  // Partial sums of staged row b . weight row u, each over one part of the padded G*H: a thread
  // takes one unit, NB consecutive staged rows and one part.
  RNNATTN_HD void multiply_rows(int64_t n, int64_t thread, int64_t threads) const {
    const int64_t U = args.units, P = args.parts, groups = (n + NB - 1) / NB, quads = width / 4;
    for (int64_t i = thread; i < U * groups * P; i += threads) {
      const int64_t u = i % U, first = (i / U) % groups * NB, p = i / (U * groups);
      const int64_t k0 = p * quads / P * 4, k1 = (p + 1) * quads / P * 4;
      A sum[NB] = {};
      add_row_dots(weights + u * width, staged + first * width, width, k0, k1, sum);
RNNATTN_UNROLL
      for (int64_t b = 0; b < NB; ++b) partials[(p * tile_rows + first + b) * U + u] = sum[b];
    }
  }

  // dh of rows [b0, b0 + n), this block's units, += the parts' sums (in part order: deterministic).
  RNNATTN_HD void accumulate_rows(int64_t b0, int64_t n, int64_t thread, int64_t threads) const {
    const int64_t U = args.units, H = args.step.hidden;
    T* dh = args.step.dstate[0];
    for (int64_t i = thread; i < n * units; i += threads) {
      const int64_t b = i / units, u = i % units;
      A total = A(0);
      for (int64_t p = 0; p < args.parts; ++p) total += partials[(p * tile_rows + b) * U + u];
      T& carried = dh[(b0 + b) * H + first_unit + u];
      carried = IO::store(IO::load(carried) + total);
    }
  }
};

}  // namespace rnnattn
