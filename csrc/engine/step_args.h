// What one pointwise pass of the time loop reads and writes, as raw pointers.
// Shared by the CPU loops and the CUDA kernels; free of torch on purpose.
//
// A step works on a block of hidden units [unit_begin, unit_end) of every batch row (the CPU gives
// each thread its own block; CUDA uses one block of all units), or on the CPU of rows
// [row_begin, row_end) only (a split by batch rows: each thread its own rows, every unit).
//
// Layouts:
//   projections (xproj, hproj) and their gradients (dxg, dhg): gate g of unit j of row b at
//     ptr + b * row_stride + g * gate_stride + (j - unit_begin)
//     (the plain layout of a (B, G*H) matrix has row_stride G*H, gate_stride H, unit_begin 0);
//   state planes, grad_output: contiguous (B, H), unit j of row b at b*H + j;
//   saved: kSaved planes of (B, H), plane s at saved + s*B*H.
//
// Variable lengths (SPEC): with `lengths` set, row b takes part in the step only when time < lengths[b];
// otherwise it is held: its states pass through unchanged and it gets no gradient of its own.
#pragma once
#include <cstdint>
#include <type_traits>

#include "cells/cell_math.h"

namespace rnnattn {

constexpr int kMaxStates = 2;

// Storage of 16-bit floats as seen by code that does not know torch's or CUDA's half types.
struct f16_t {
  uint16_t bits;
};
struct bf16_t {
  uint16_t bits;
};

// Where the gates of a block of units live in a projection-shaped buffer.
template <typename T>
struct GateView {
  T* ptr;
  int64_t row_stride;
  int64_t gate_stride;
  RNNATTN_HD T& at(int64_t b, int g, int64_t local_unit) const {
    return ptr[b * row_stride + g * gate_stride + local_unit];
  }
};

template <typename T>
struct ForwardStepArgs {
  GateView<const T> xproj;      // W_ih x_t + b_ih
  GateView<const T> hproj;      // W_hh h_{t-1} + b_hh, or without b_hh when hbias is set
  GateView<const T> hbias;      // b_hh at row 0 (row_stride 0) when the pass adds it (the CUDA path,
                                // whose per-step product is a bare cuBLAS call); ptr null otherwise.
                                // The passes dispatch on it and cproj once (step_extra), not per unit.
  GateView<const T> cproj;      // attention cell: W_c ctx_t, added to the input side; ptr null otherwise
  const T* prev[kMaxStates];    // states before the step
  T* next[kMaxStates];          // states after the step; next[0] is the output row y_t
  T* saved;                     // activations for backward, or nullptr in inference
  const int64_t* lengths;       // (B,) valid steps per row, or nullptr (every row takes every step)
  int64_t time;                 // the step's time index, compared with lengths
  int64_t batch;
  int64_t hidden;
  int64_t unit_begin, unit_end;
  int64_t row_begin = 0, row_end = -1;  // the CPU passes' rows; row_end < 0: to batch (CUDA: every row)
};

template <typename T>
struct BackwardStepArgs {
  const T* saved;
  const T* prev[kMaxStates];
  const T* next[kMaxStates];
  const T* grad_output;         // dL/dy_t, added to the carried gradient of h_t
  T* dstate[kMaxStates];        // in: carried gradients of the states after the step;
                                // out, in place: their direct gradients before the step
  GateView<T> dxg;              // gradient of the input-side pre-activations
  GateView<T> dhg;              // gradient of the recurrent-side ones: written when the cell has a
                                // separate one, else (equal to dxg) only when ptr is not null
  const int64_t* lengths;       // as in ForwardStepArgs
  int64_t time;
  int64_t batch;
  int64_t hidden;
  int64_t unit_begin, unit_end;
  int64_t row_begin = 0, row_end = -1;  // the CPU passes' rows; row_end < 0: to batch (CUDA: every row)
};

// Where a forward pass's states and saved activations lie, step by step: one description for the
// loop over blocks (CPU, and CUDA step by step) and for the CUDA kernel that runs every step itself.
// State slot 0 is h (the output row y_t), or with a projection m_t; slots 1.. the cell's other states.
// Training keeps every step's states in the workspace (T, planes, B, H); inference keeps the slots
// other than the output in two alternating (B, H) buffers.
template <typename T>
struct ForwardLayout {
  T* output;                      // (T, B, H) when slot 0 is the output
  const T* initial[kMaxStates];   // the states before the first step
  T* workspace;                   // training only: (T, planes, B, H), step t's saved activations first
  T* alternate[kMaxStates][2];    // inference only: slot s after step k is alternate[s][k % 2]
  int plane_of[kMaxStates];       // a slot's plane in a workspace step; -1: the slot is the output
  int planes;
  bool training;
  bool reverse;
  int64_t steps;
  int64_t plane;                  // B * H

  RNNATTN_HD int64_t time(int64_t k) const { return reverse ? steps - 1 - k : k; }
  // State slot s after step k.
  RNNATTN_HD T* after(int64_t k, int s) const {
    const int64_t t = time(k);
    if (plane_of[s] < 0) return output + t * plane;
    return training ? workspace + (t * planes + plane_of[s]) * plane : alternate[s][k % 2];
  }
  RNNATTN_HD const T* before(int64_t k, int s) const { return k == 0 ? initial[s] : after(k - 1, s); }
  // Step k's states, saved activations and time into a's per-step fields (ForwardStepArgs, or
  // BackwardStepArgs, which read what the training forward wrote).
  template <int S, class StepArgs>
  RNNATTN_HD void fill(StepArgs& a, int64_t k) const {
    for (int s = 0; s < S; ++s) {
      a.prev[s] = before(k, s);
      a.next[s] = after(k, s);
    }
    a.time = time(k);
    a.saved = training ? workspace + a.time * planes * plane : nullptr;
  }
};

// What a forward pass adds to the pre-activations besides the two projections: a compile-time
// switch of the loops (forward_unit), chosen once per pass.
enum class StepExtra { none, context, hidden_bias, context_and_hidden_bias };
template <typename T>
RNNATTN_HD StepExtra step_extra(const ForwardStepArgs<T>& a) {
  const bool context = a.cproj.ptr != nullptr, bias = a.hbias.ptr != nullptr;
  if (context) return bias ? StepExtra::context_and_hidden_bias : StepExtra::context;
  return bias ? StepExtra::hidden_bias : StepExtra::none;
}
// Calls f(std::integral_constant<StepExtra, E>{}) for the pass's E: the one place that turns the
// run-time choice into the loops' compile-time switch (CPU passes and CUDA launches alike).
template <typename T, class F>
inline void dispatch_step_extra(const ForwardStepArgs<T>& a, F&& f) {
  switch (step_extra(a)) {
    case StepExtra::none: return f(std::integral_constant<StepExtra, StepExtra::none>{});
    case StepExtra::context: return f(std::integral_constant<StepExtra, StepExtra::context>{});
    case StepExtra::hidden_bias: return f(std::integral_constant<StepExtra, StepExtra::hidden_bias>{});
    case StepExtra::context_and_hidden_bias:
      return f(std::integral_constant<StepExtra, StepExtra::context_and_hidden_bias>{});
  }
}
RNNATTN_HD constexpr bool adds_context(StepExtra e) {
  return e == StepExtra::context || e == StepExtra::context_and_hidden_bias;
}
RNNATTN_HD constexpr bool adds_hidden_bias(StepExtra e) {
  return e == StepExtra::hidden_bias || e == StepExtra::context_and_hidden_bias;
}

// The end of the rows a CPU pass runs (ForwardStepArgs, BackwardStepArgs, AttentionStepArgs).
template <class Args>
inline int64_t row_end(const Args& a) {
  return a.row_end < 0 ? a.batch : a.row_end;
}

// Whether row b takes part in the step (variable lengths), or is held.
template <class Args>
RNNATTN_HD bool row_active(const Args& a, int64_t b) {
  return a.lengths == nullptr || a.time < a.lengths[b];
}

// Cells that save nothing still get a one-element array (C++ has no empty arrays).
template <class Cell>
inline constexpr int kSavedSlots = Cell::kSaved > 0 ? Cell::kSaved : 1;

// Load and store through the accumulate type A (float for 16-bit types, else the type itself).
template <typename T>
struct ScalarIO {
  using Acc = T;
  RNNATTN_HD static Acc load(T v) { return v; }
  RNNATTN_HD static T store(Acc v) { return v; }
};

// Pointwise work of unit j of batch row b: the whole cell, from the two projections to the new states.
// kSave: training, store the activations backward needs; kExtra: what else to add (cproj, the
// attention cell's context, or hbias). Compile-time switches keep the loops branch-free, so that
// they vectorize.
template <class Cell, typename T, bool kSave, StepExtra kExtra = StepExtra::none>
RNNATTN_HD void forward_unit(const ForwardStepArgs<T>& a, int64_t b, int64_t j) {
  using IO = ScalarIO<T>;
  using A = typename IO::Acc;
  constexpr int G = Cell::kGates, S = Cell::kStates, K = kSavedSlots<Cell>;
  const int64_t H = a.hidden, plane = a.batch * H, u = b * H + j, local = j - a.unit_begin;
  A xg[G], hg[G], prev[S], next[S], saved[K];
RNNATTN_UNROLL
  for (int g = 0; g < G; ++g) {
    xg[g] = IO::load(a.xproj.at(b, g, local));
    hg[g] = IO::load(a.hproj.at(b, g, local));
  }
  if constexpr (adds_context(kExtra)) {
RNNATTN_UNROLL
    for (int g = 0; g < G; ++g) xg[g] += IO::load(a.cproj.at(b, g, local));
  }
  if constexpr (adds_hidden_bias(kExtra)) {
RNNATTN_UNROLL
    for (int g = 0; g < G; ++g) hg[g] += IO::load(a.hbias.at(0, g, local));
  }
RNNATTN_UNROLL
  for (int s = 0; s < S; ++s) prev[s] = IO::load(a.prev[s][u]);
  Cell::forward(xg, hg, prev, next, saved);
RNNATTN_UNROLL
  for (int s = 0; s < S; ++s) a.next[s][u] = IO::store(next[s]);
  if constexpr (kSave) {
RNNATTN_UNROLL
    for (int k = 0; k < Cell::kSaved; ++k) a.saved[k * plane + u] = IO::store(saved[k]);
  }
}

// kHiddenCopy: a cell without a separate recurrent-side gradient also writes dxg to dhg.
template <class Cell, typename T, bool kHiddenCopy = false>
RNNATTN_HD void backward_unit(const BackwardStepArgs<T>& a, int64_t b, int64_t j) {
  using IO = ScalarIO<T>;
  using A = typename IO::Acc;
  constexpr int G = Cell::kGates, S = Cell::kStates, K = kSavedSlots<Cell>;
  const int64_t H = a.hidden, plane = a.batch * H, u = b * H + j, local = j - a.unit_begin;
  A saved[K], prev[S], next[S], dnext[S], dxg[G], dhg[G], dprev[S];
RNNATTN_UNROLL
  for (int k = 0; k < K; ++k) saved[k] = k < Cell::kSaved ? IO::load(a.saved[k * plane + u]) : A(0);
RNNATTN_UNROLL
  for (int s = 0; s < S; ++s) {
    prev[s] = IO::load(a.prev[s][u]);
    next[s] = IO::load(a.next[s][u]);
    dnext[s] = IO::load(a.dstate[s][u]);
  }
  dnext[0] += IO::load(a.grad_output[u]);
  Cell::backward(saved, prev, next, dnext, dxg, dhg, dprev);
RNNATTN_UNROLL
  for (int g = 0; g < G; ++g) a.dxg.at(b, g, local) = IO::store(dxg[g]);
  if constexpr (Cell::kSeparateHiddenGrad) {
RNNATTN_UNROLL
    for (int g = 0; g < G; ++g) a.dhg.at(b, g, local) = IO::store(dhg[g]);
  } else if constexpr (kHiddenCopy) {
RNNATTN_UNROLL
    for (int g = 0; g < G; ++g) a.dhg.at(b, g, local) = IO::store(dxg[g]);
  }
RNNATTN_UNROLL
  for (int s = 0; s < S; ++s) a.dstate[s][u] = IO::store(dprev[s]);
}

// A held row in the forward: every state passes through (next = prev); the output row y_t holds the
// carried h until the engine zeroes the padded steps after the loop. Its saved activations, which
// backward never reads, are zeros (the workspace is an op output: no uninitialised memory in it).
template <class Cell, typename T>
RNNATTN_HD void hold_forward_unit(const ForwardStepArgs<T>& a, int64_t b, int64_t j) {
  using IO = ScalarIO<T>;
  using A = typename IO::Acc;
  const int64_t u = b * a.hidden + j;
RNNATTN_UNROLL
  for (int s = 0; s < Cell::kStates; ++s) a.next[s][u] = a.prev[s][u];
  if (a.saved != nullptr) {
RNNATTN_UNROLL
    for (int k = 0; k < Cell::kSaved; ++k) a.saved[k * a.batch * a.hidden + u] = IO::store(A(0));
  }
}

// A held row in the backward: the carried state gradients pass through unchanged (in place: nothing
// to do), the pre-activation gradients are zero, and grad_output is not read (y_t is a constant 0).
template <class Cell, typename T, bool kHiddenCopy = false>
RNNATTN_HD void hold_backward_unit(const BackwardStepArgs<T>& a, int64_t b, int64_t j) {
  using IO = ScalarIO<T>;
  using A = typename IO::Acc;
  const int64_t local = j - a.unit_begin;
RNNATTN_UNROLL
  for (int g = 0; g < Cell::kGates; ++g) a.dxg.at(b, g, local) = IO::store(A(0));
  if constexpr (Cell::kSeparateHiddenGrad || kHiddenCopy) {
RNNATTN_UNROLL
    for (int g = 0; g < Cell::kGates; ++g) a.dhg.at(b, g, local) = IO::store(A(0));
  }
}

}  // namespace rnnattn
