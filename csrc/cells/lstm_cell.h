// LSTM cell (torch.nn.LSTM gate order i, f, g, o): forward and backward of one unit.
#pragma once
#include "cells/cell_math.h"

namespace rnnattn {

struct LstmCell {
  static constexpr const char* kName = "lstm";
  static constexpr int kGates = 4;
  static constexpr int kStates = 2;  // h, c
  static constexpr int kSaved = 4;   // activated gates i, f, g, o (c_t is kept as a state plane)
  // W_hh h enters every gate exactly as W_ih x does, so both projections share one gradient.
  static constexpr bool kSeparateHiddenGrad = false;

  template <typename A>
  RNNATTN_HD static void forward(const A (&xg)[kGates], const A (&hg)[kGates], const A (&prev)[kStates],
                                 A (&next)[kStates], A (&saved)[kSaved]) {
    const A i = math::sigmoid(xg[0] + hg[0]);
    const A f = math::sigmoid(xg[1] + hg[1]);
    const A g = math::tanh_(xg[2] + hg[2]);
    const A o = math::sigmoid(xg[3] + hg[3]);
    const A c = f * prev[1] + i * g;
    next[0] = o * math::tanh_(c);
    next[1] = c;
    saved[0] = i;
    saved[1] = f;
    saved[2] = g;
    saved[3] = o;
  }

  // dnext: gradients of the states after the step; dprev: the part of the previous states'
  // gradients that does not flow through W_hh (the engine adds dhg @ W_hh to dprev[0]).
  template <typename A>
  RNNATTN_HD static void backward(const A (&saved)[kSaved], const A (&prev)[kStates], const A (&next)[kStates],
                                  const A (&dnext)[kStates], A (&dxg)[kGates], A (&dhg)[kGates],
                                  A (&dprev)[kStates]) {
    const A i = saved[0], f = saved[1], g = saved[2], o = saved[3];
    const A tc = math::tanh_(next[1]);
    const A dh = dnext[0];
    const A dc = dnext[1] + dh * o * (A(1) - tc * tc);
    dxg[0] = dc * g * i * (A(1) - i);
    dxg[1] = dc * prev[1] * f * (A(1) - f);
    dxg[2] = dc * i * (A(1) - g * g);
    dxg[3] = dh * tc * o * (A(1) - o);
    for (int k = 0; k < kGates; ++k) dhg[k] = dxg[k];
    dprev[0] = A(0);
    dprev[1] = dc * f;
  }
};

}  // namespace rnnattn
