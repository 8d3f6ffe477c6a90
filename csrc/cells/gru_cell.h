// GRU cell exactly as torch.nn.GRU (gate order r, z, n; r multiplies W_hn h + b_hn).
#pragma once
#include "cells/cell_math.h"

namespace rnnattn {

struct GruCell {
  static constexpr const char* kName = "gru";
  static constexpr int kGates = 3;
  static constexpr int kStates = 1;  // h
  static constexpr int kSaved = 4;   // r, z, n and the recurrent term W_hn h + b_hn
  // r scales the recurrent n term only, so the gradients of the two projections differ there.
  static constexpr bool kSeparateHiddenGrad = true;

  template <typename A>
  RNNATTN_HD static void forward(const A (&xg)[kGates], const A (&hg)[kGates], const A (&prev)[kStates],
                                 A (&next)[kStates], A (&saved)[kSaved]) {
    const A r = math::sigmoid(xg[0] + hg[0]);
    const A z = math::sigmoid(xg[1] + hg[1]);
    const A n = math::tanh_(xg[2] + r * hg[2]);
    next[0] = (A(1) - z) * n + z * prev[0];
    saved[0] = r;
    saved[1] = z;
    saved[2] = n;
    saved[3] = hg[2];
  }

  template <typename A>
  RNNATTN_HD static void backward(const A (&saved)[kSaved], const A (&prev)[kStates], const A (&next)[kStates],
                                  const A (&dnext)[kStates], A (&dxg)[kGates], A (&dhg)[kGates],
                                  A (&dprev)[kStates]) {
    (void)next;
    const A r = saved[0], z = saved[1], n = saved[2], hn = saved[3];
    const A dh = dnext[0];
    const A dn = dh * (A(1) - z) * (A(1) - n * n);
    const A dz = dh * (prev[0] - n) * z * (A(1) - z);
    const A dr = dn * hn * r * (A(1) - r);
    dxg[0] = dr;
    dxg[1] = dz;
    dxg[2] = dn;
    dhg[0] = dr;
    dhg[1] = dz;
    dhg[2] = dn * r;
    dprev[0] = dh * z;
  }
};

}  // namespace rnnattn
