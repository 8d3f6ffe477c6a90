// The LSTM projection (torch.nn's proj_size, SPEC): the cell's hidden output m_t (H) becomes the
// state y_t = W_hr m_t (P) that the output, the next step and the attention stage read. The engine
// multiplies by W_hr in GEMMs; the per-row work around them, which variable lengths need, is here,
// shared by the CPU loops and the CUDA kernels.
//
// Layout: (B, P) planes, element (b, p) at b * P + p; a pass covers the columns [col_begin, col_end)
// of every row (the CPU gives each thread its own columns; CUDA uses all of them).
#pragma once
#include <cstdint>

#include "engine/step_args.h"

namespace rnnattn {

// Forward: a held row keeps y_{t-1} (its m_t is not its state: the projection of a held row's
// carried m would not give back the y it started from, e.g. h_0 in reverse).
template <typename T>
struct ProjectionHoldArgs {
  T* output;              // y_t, already W_hr m_t for every row
  const T* previous;      // y_{t-1}
  const int64_t* lengths; // (B,) or nullptr
  int64_t time;
  int64_t batch, width;   // B, P
  int64_t col_begin, col_end;
};

template <typename T>
RNNATTN_HD void hold_projected(const ProjectionHoldArgs<T>& a, int64_t b, int64_t p) {
  if (a.lengths != nullptr && a.time >= a.lengths[b]) a.output[b * a.width + p] = a.previous[b * a.width + p];
}

// Backward, before step k's pointwise pass: dL/dy_t of every row, from the step after it (k + 1):
// that step's recurrent GEMM shares where the row took it, else (held) what the row carried; plus
// grad_output of an active row. Also writes the step's dy for dW_hr (zero for a held row).
// After the loop the same pass with time = -1 and no grad_output makes dL/dh_0.
template <typename T>
struct ProjectionCarryArgs {
  T* carried;               // in: dL/dy_{t+1} as carried; out: dL/dy_t
  const T* shares;          // (count, B, P): step k + 1's dg_rec @ W_rec, one per block, or unused
  int64_t share_count;      // 0: there is no step k + 1 (carried holds grad_h_n)
  const T* grad_output;     // (B, P) at time t, or nullptr
  T* step_grad;             // (B, P): dy_t of the active rows, 0 for held ones; or nullptr
  const int64_t* lengths;   // (B,) or nullptr
  int64_t time, next_time;  // times of steps k and k + 1 (time < 0: none)
  int64_t batch, width;
  int64_t col_begin, col_end;
};

template <typename T>
RNNATTN_HD void carry_projected_grad(const ProjectionCarryArgs<T>& a, int64_t b, int64_t p) {
  using IO = ScalarIO<T>;
  using A = typename IO::Acc;
  const int64_t u = b * a.width + p, plane = a.batch * a.width;
  A v = IO::load(a.carried[u]);
  if (a.share_count > 0 && (a.lengths == nullptr || a.next_time < a.lengths[b])) {
    v = A(0);
    for (int64_t c = 0; c < a.share_count; ++c) v += IO::load(a.shares[c * plane + u]);
  }
  const bool active = a.time >= 0 && (a.lengths == nullptr || a.time < a.lengths[b]);
  if (active && a.grad_output != nullptr) v += IO::load(a.grad_output[u]);
  a.carried[u] = IO::store(v);
  if (a.step_grad != nullptr) a.step_grad[u] = IO::store(active ? v : A(0));
}

// One element of either pass: the CPU loop and the CUDA kernel are written once for both.
template <typename T>
RNNATTN_HD void projection_element(const ProjectionHoldArgs<T>& a, int64_t b, int64_t p) {
  hold_projected(a, b, p);
}
template <typename T>
RNNATTN_HD void projection_element(const ProjectionCarryArgs<T>& a, int64_t b, int64_t p) {
  carry_projected_grad(a, b, p);
}

}  // namespace rnnattn
