// Device implementations of the recurrent-layer ops: check the arguments, run the engine.
// The same functions serve CPU and CUDA; the engine picks the pointwise pass by device.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "cells/all_cells.h"
#include "engine/recurrent_engine.h"
#include "ops/argument_checks.h"

namespace rnnattn {
namespace {

using at::Tensor;

// Op name of a cell: "rnnattn::<cell>_forward".
template <class Cell>
std::string op_name(const char* suffix) {
  return std::string("rnnattn.") + Cell::kName + suffix;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_forward(const Tensor& input, const Tensor& h0, const Tensor& c0,
                                                        const Tensor& weight_ih, const Tensor& weight_hh,
                                                        const std::optional<Tensor>& bias_ih,
                                                        const std::optional<Tensor>& bias_hh,
                                                        const std::optional<Tensor>& weight_hr,
                                                        const std::optional<Tensor>& lengths, bool reverse,
                                                        bool training) {
  const auto op = op_name<LstmCell>("_forward");
  const LayerShape shape = check_layer_forward(op.c_str(), LstmCell::kGates, input, {{"h0", h0}, {"c0", c0}},
                                               weight_ih, weight_hh, bias_ih, bias_hh, weight_hr);
  check_sequence_lengths(op.c_str(), shape, input, lengths);
  auto r = recurrent_forward<LstmCell>(input, {h0, c0}, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, lengths,
                                       reverse, training);
  return {r.output, r.final_states[0], r.final_states[1], r.workspace};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_backward(
    const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& grad_c_n, const Tensor& input, const Tensor& h0,
    const Tensor& c0, const Tensor& weight_ih, const Tensor& weight_hh, const std::optional<Tensor>& weight_hr,
    const Tensor& output, const Tensor& workspace, const std::optional<Tensor>& lengths, bool reverse) {
  const auto op = op_name<LstmCell>("_backward");
  const LayerShape shape =
      check_layer_backward(op.c_str(), LstmCell::kGates, workspace_planes<LstmCell>(weight_hr.has_value()),
                           grad_output, {{"grad_h_n", grad_h_n}, {"grad_c_n", grad_c_n}}, input,
                           {{"h0", h0}, {"c0", c0}}, weight_ih, weight_hh, weight_hr, output, workspace);
  check_sequence_lengths(op.c_str(), shape, input, lengths);
  auto r = recurrent_backward<LstmCell>(grad_output, {grad_h_n, grad_c_n}, input, {h0, c0}, weight_ih, weight_hh,
                                        weight_hr, output, workspace, lengths, reverse);
  return {r.grad_input,     r.grad_initial_states[0], r.grad_initial_states[1], r.grad_weight_ih,
          r.grad_weight_hh, r.grad_bias_ih,           r.grad_bias_hh,           r.grad_weight_hr};
}

// Cells whose only state is h (GRU, Elman RNNs).
template <class Cell>
std::tuple<Tensor, Tensor, Tensor> single_state_forward(const Tensor& input, const Tensor& h0, const Tensor& weight_ih,
                                                        const Tensor& weight_hh, const std::optional<Tensor>& bias_ih,
                                                        const std::optional<Tensor>& bias_hh,
                                                        const std::optional<Tensor>& lengths, bool reverse,
                                                        bool training) {
  static_assert(Cell::kStates == 1);
  const auto op = op_name<Cell>("_forward");
  const LayerShape shape =
      check_layer_forward(op.c_str(), Cell::kGates, input, {{"h0", h0}}, weight_ih, weight_hh, bias_ih, bias_hh);
  check_sequence_lengths(op.c_str(), shape, input, lengths);
  auto r = recurrent_forward<Cell>(input, {h0}, weight_ih, weight_hh, bias_ih, bias_hh, std::nullopt, lengths, reverse,
                                   training);
  return {r.output, r.final_states[0], r.workspace};
}

template <class Cell>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> single_state_backward(
    const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& input, const Tensor& h0, const Tensor& weight_ih,
    const Tensor& weight_hh, const Tensor& output, const Tensor& workspace, const std::optional<Tensor>& lengths,
    bool reverse) {
  const auto op = op_name<Cell>("_backward");
  const LayerShape shape =
      check_layer_backward(op.c_str(), Cell::kGates, workspace_planes<Cell>(), grad_output, {{"grad_h_n", grad_h_n}},
                           input, {{"h0", h0}}, weight_ih, weight_hh, std::nullopt, output, workspace);
  check_sequence_lengths(op.c_str(), shape, input, lengths);
  auto r = recurrent_backward<Cell>(grad_output, {grad_h_n}, input, {h0}, weight_ih, weight_hh, std::nullopt, output,
                                    workspace, lengths, reverse);
  return {r.grad_input, r.grad_initial_states[0], r.grad_weight_ih, r.grad_weight_hh, r.grad_bias_ih, r.grad_bias_hh};
}

void register_recurrent_ops(torch::Library& m) {
  m.impl("lstm_forward", &lstm_forward);
  m.impl("lstm_backward", &lstm_backward);
  m.impl("gru_forward", &single_state_forward<GruCell>);
  m.impl("gru_backward", &single_state_backward<GruCell>);
  m.impl("rnn_tanh_forward", &single_state_forward<RnnTanhCell>);
  m.impl("rnn_tanh_backward", &single_state_backward<RnnTanhCell>);
  m.impl("rnn_relu_forward", &single_state_forward<RnnReluCell>);
  m.impl("rnn_relu_backward", &single_state_backward<RnnReluCell>);
}

}  // namespace

TORCH_LIBRARY_IMPL(rnnattn, CPU, m) { register_recurrent_ops(m); }

#ifdef RNNATTN_WITH_CUDA
TORCH_LIBRARY_IMPL(rnnattn, CUDA, m) { register_recurrent_ops(m); }
#endif

}  // namespace rnnattn
