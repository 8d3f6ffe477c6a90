// Elman RNN cells: h' = act(W_ih x + b_ih + W_hh h + b_hh) with act = tanh or relu.
#pragma once
#include "cells/cell_math.h"

namespace rnnattn {

template <bool kRelu>
struct ElmanCell {
  static constexpr const char* kName = kRelu ? "rnn_relu" : "rnn_tanh";
  static constexpr int kGates = 1;
  static constexpr int kStates = 1;  // h
  static constexpr int kSaved = 0;   // the derivative follows from h' alone
  static constexpr bool kSeparateHiddenGrad = false;

  template <typename A>
  RNNATTN_HD static void forward(const A (&xg)[kGates], const A (&hg)[kGates], const A (&prev)[kStates],
                                 A (&next)[kStates], A (&saved)[1]) {
    (void)prev;
    (void)saved;
    const A pre = xg[0] + hg[0];
    next[0] = kRelu ? math::relu(pre) : math::tanh_(pre);
  }

  template <typename A>
  RNNATTN_HD static void backward(const A (&saved)[1], const A (&prev)[kStates], const A (&next)[kStates],
                                  const A (&dnext)[kStates], A (&dxg)[kGates], A (&dhg)[kGates],
                                  A (&dprev)[kStates]) {
    (void)saved;
    (void)prev;
    const A h = next[0];
    const A slope = kRelu ? (h > A(0) ? A(1) : A(0)) : (A(1) - h * h);
    dxg[0] = dnext[0] * slope;
    dhg[0] = dxg[0];
    dprev[0] = A(0);
  }
};

using RnnTanhCell = ElmanCell<false>;
using RnnReluCell = ElmanCell<true>;

}  // namespace rnnattn
