// The time loop shared by every cell and both devices: GEMMs through ATen (MKL/cuBLAS on the
// current stream), one pointwise pass per step from csrc/cells, large GEMMs after the backward loop.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace rnnattn {

struct RecurrentForward {
  at::Tensor output;                     // (T, B, H)
  std::vector<at::Tensor> final_states;  // kStates tensors of (B, H)
  at::Tensor workspace;                  // (T, planes, B, H) when training, else empty
};

struct RecurrentBackward {
  at::Tensor grad_input;
  std::vector<at::Tensor> grad_initial_states;
  at::Tensor grad_weight_ih, grad_weight_hh, grad_bias_ih, grad_bias_hh;
};

// Workspace planes per step: the cell's saved activations plus its states other than h.
template <class Cell>
constexpr int workspace_planes() {
  return Cell::kSaved + Cell::kStates - 1;
}

// Arguments are checked by the caller (csrc/ops); the engine trusts shapes, dtypes and devices.
template <class Cell>
RecurrentForward recurrent_forward(const at::Tensor& input, const std::vector<at::Tensor>& initial_states,
                                   const at::Tensor& weight_ih, const at::Tensor& weight_hh,
                                   const std::optional<at::Tensor>& bias_ih,
                                   const std::optional<at::Tensor>& bias_hh, bool reverse, bool training);

template <class Cell>
RecurrentBackward recurrent_backward(const at::Tensor& grad_output, const std::vector<at::Tensor>& grad_final_states,
                                     const at::Tensor& input, const std::vector<at::Tensor>& initial_states,
                                     const at::Tensor& weight_ih, const at::Tensor& weight_hh,
                                     const at::Tensor& output, const at::Tensor& workspace, bool reverse);

}  // namespace rnnattn
