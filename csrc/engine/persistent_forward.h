// The forward time loop as one CUDA kernel that runs every step (engine/cuda/persistent_cuda.cu):
// thread block c owns hidden units [c U, c U + U) of every batch row, keeps their rows of W_hh in
// shared memory for the whole sequence, and per step multiplies h_{t-1} by them and runs the cell on
// its units; a grid-wide barrier ends the step (h_t is the only thing blocks share). Against a
// cuBLAS product and a pointwise launch per step, this saves the launches (small batches spend
// most of a step there) and spreads a step's product over every SM (cuBLAS tiles a 64-row product
// into a few thread blocks).
//
// This header is the work of one block between barriers, in phases that end where the kernel
// synchronises its threads; free of CUDA, so that the host compiler runs the same phases thread by
// thread (tests/cpp/persistent_loop_check.cpp).
#pragma once
#include <cstdint>

#include "engine/step_args.h"

namespace rnnattn {

// Batch rows per thread in the product: each weight value read from shared memory serves this many.
constexpr int64_t kPersistentRowsPerThread = 4;

template <typename T>
struct PersistentForwardArgs {
  ForwardStepArgs<T> step;  // xproj (time 0: row t*B + b), hbias, lengths, batch, hidden; the
                            // per-step fields come from `layout`, the block's own from the block
  ForwardLayout<T> layout;  // slot 0 must be the output (no projection)
  const T* weight;          // W_hh (G*H, H), torch.nn's row order
  int64_t units;            // U, hidden units per thread block
  int64_t batch_tile;       // rows of h_{t-1} staged in shared memory at a time
};

// Thread blocks of a loop whose blocks own `units` hidden units each (the last may own fewer).
RNNATTN_HD int64_t persistent_blocks(int64_t hidden, int64_t units) { return (hidden + units - 1) / units; }

// Shared memory of one block, in the accumulate type A: the block's weight rows (G*U rows of
// padded_width), a tile of h_{t-1} rows, then the block's gate pre-activations of every row in T.
RNNATTN_HD int64_t persistent_padded_width(int64_t hidden) {
  // A multiple of 4 (vector loads) whose quarter is odd: consecutive rows start in other banks.
  int64_t width = (hidden + 3) / 4 * 4;
  if ((width / 4) % 2 == 0) width += 4;
  return width;
}
RNNATTN_HD int64_t persistent_tile_rows(int64_t batch_tile) {
  return (batch_tile + kPersistentRowsPerThread - 1) / kPersistentRowsPerThread * kPersistentRowsPerThread;
}
template <class Cell, typename T>
int64_t persistent_shared_bytes(int64_t batch, int64_t hidden, int64_t units, int64_t batch_tile) {
  using A = typename ScalarIO<T>::Acc;
  const int64_t rows = Cell::kGates * units, width = persistent_padded_width(hidden);
  return (rows + persistent_tile_rows(batch_tile)) * width * int64_t(sizeof(A)) + batch * rows * int64_t(sizeof(T));
}

template <typename A>
struct Quad {
  A v[4];
};
// Four consecutive values at a 16-byte aligned (float) or 32-byte aligned (double) address.
template <typename A>
RNNATTN_HD Quad<A> load_quad(const A* p) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(A) == 4) {
    const float4 q = *reinterpret_cast<const float4*>(p);
    return {{q.x, q.y, q.z, q.w}};
  } else {
    const double2 a = *reinterpret_cast<const double2*>(p), b = *reinterpret_cast<const double2*>(p + 2);
    return {{a.x, a.y, b.x, b.y}};
  }
#else
  return {{p[0], p[1], p[2], p[3]}};
#endif
}

// sum[b] += w[k0, k1) . rows[b][k0, k1) for NB rows `width` apart (k0, k1 multiples of 4), in a
// fixed order (deterministic).
template <int64_t NB, typename A>
RNNATTN_HD void add_row_dots(const A* w, const A* rows, int64_t width, int64_t k0, int64_t k1, A (&sum)[NB]) {
  for (int64_t k = k0; k < k1; k += 4) {
    const Quad<A> wq = load_quad(w + k);
RNNATTN_UNROLL
    for (int64_t b = 0; b < NB; ++b) {
      const Quad<A> hq = load_quad(rows + b * width + k);
      sum[b] += wq.v[0] * hq.v[0] + wq.v[1] * hq.v[1] + wq.v[2] * hq.v[2] + wq.v[3] * hq.v[3];
    }
  }
}

// Block `block`'s phases. Thread `thread` of `threads` does its share of each; a phase reads what
// the previous phases wrote only after the block's threads have synchronised.
template <class Cell, typename T, bool kSave, StepExtra kExtra>
struct PersistentForwardBlock {
  using IO = ScalarIO<T>;
  using A = typename IO::Acc;
  static constexpr int G = Cell::kGates;
  static constexpr int64_t NB = kPersistentRowsPerThread;

  const PersistentForwardArgs<T>& args;
  int64_t first_unit, units;  // this block's units [first_unit, first_unit + units)
  int64_t rows, width;        // G * U weight rows (row g * U + u: gate g of unit first_unit + u), padded H
  A* weights;                 // rows x width
  A* staged;                  // tile rows x width: rows of h_{t-1}
  T* gates;                   // (B, rows): h_{t-1} @ W^T for this block's rows

  RNNATTN_HD PersistentForwardBlock(const PersistentForwardArgs<T>& a, int64_t block, void* shared)
      : args(a) {
    const int64_t H = a.step.hidden;
    first_unit = block * a.units;
    units = H - first_unit < a.units ? H - first_unit : a.units;
    rows = G * a.units;
    width = persistent_padded_width(H);
    weights = static_cast<A*>(shared);
    staged = weights + rows * width;
    gates = reinterpret_cast<T*>(staged + persistent_tile_rows(a.batch_tile) * width);
  }

  // Once: the block's rows of W_hh; missing units (the last block's) and the padding are zeros.
  RNNATTN_HD void load_weights(int64_t thread, int64_t threads) const {
    const int64_t H = args.step.hidden;
    for (int64_t i = thread; i < rows * width; i += threads) {
      const int64_t r = i / width, k = i % width, g = r / args.units, u = r % args.units;
      weights[i] = k < H && u < units ? IO::load(args.weight[(g * H + first_unit + u) * H + k]) : A(0);
    }
  }

  // Rows [b0, b0 + n) of h_{t-1} into the staging tile (the tile's other rows: zeros).
  RNNATTN_HD void stage_rows(const T* h_prev, int64_t b0, int64_t n, int64_t thread, int64_t threads) const {
    const int64_t H = args.step.hidden, tile = persistent_tile_rows(args.batch_tile);
    for (int64_t i = thread; i < tile * width; i += threads) {
      const int64_t b = i / width, k = i % width;
      staged[i] = b < n && k < H ? IO::load(h_prev[(b0 + b) * H + k]) : A(0);
    }
  }

  // gates[b0 + b, r] = staged row b . weight row r for the n staged rows: a thread takes one weight
  // row and NB consecutive staged rows.
  RNNATTN_HD void multiply_rows(int64_t b0, int64_t n, int64_t thread, int64_t threads) const {
    const int64_t groups = (n + NB - 1) / NB;
    for (int64_t i = thread; i < rows * groups; i += threads) {
      const int64_t r = i % rows, first = (i / rows) * NB;
      A sum[NB] = {};
      add_row_dots(weights + r * width, staged + first * width, width, 0, width, sum);
RNNATTN_UNROLL
      for (int64_t b = 0; b < NB; ++b) {
        if (first + b < n) gates[(b0 + first + b) * rows + r] = IO::store(sum[b]);
      }
    }
  }

  // The cell on this block's units of every row at step k (after every tile's product).
  RNNATTN_HD void pointwise(int64_t k, int64_t thread, int64_t threads) const {
    ForwardStepArgs<T> a = args.step;
    args.layout.template fill<Cell::kStates>(a, k);
    const int64_t B = a.batch, H = a.hidden;
    a.xproj.ptr += a.time * B * G * H + first_unit;
    if (a.hbias.ptr != nullptr) a.hbias.ptr += first_unit;
    a.hproj = GateView<const T>{gates, rows, args.units};
    a.unit_begin = first_unit;
    a.unit_end = first_unit + units;
    for (int64_t i = thread; i < B * units; i += threads) {
      const int64_t b = i / units, j = first_unit + i % units;
      if (row_active(a, b)) {
        forward_unit<Cell, T, kSave, kExtra>(a, b, j);
      } else {
        hold_forward_unit<Cell, T>(a, b, j);
      }
    }
  }
};

}  // namespace rnnattn
