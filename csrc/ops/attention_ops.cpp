// Device implementations of the attention-augmented cell's ops (schemas in csrc/ops/schemas.cpp):
// check the arguments, run the same engine as the base layers with the attention stage switched on.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "cells/all_cells.h"
#include "engine/recurrent_engine.h"
#include "ops/argument_checks.h"

namespace rnnattn {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

template <class Cell>
std::string op_name(const char* suffix) {
  return std::string("rnnattn.") + Cell::kName + suffix;
}

std::vector<NamedTensor> named_states(const std::vector<Tensor>& states, const char* const* names) {
  std::vector<NamedTensor> out;
  for (size_t i = 0; i < states.size(); ++i) out.push_back({names[i], states[i]});
  return out;
}

constexpr const char* kStateNames[] = {"h0", "c0"};
constexpr const char* kGradFinalNames[] = {"grad_h_n", "grad_c_n"};

AttentionConfig make_config(const Tensor& weight_q, const OptTensor& bias_q, const Tensor& weight_k,
                            const OptTensor& bias_k, const Tensor& weight_v, const OptTensor& bias_v,
                            const Tensor& weight_c, const OptTensor& memory, const OptTensor& memory_lengths,
                            const OptTensor& past_keys, const OptTensor& past_values, int64_t num_heads,
                            std::optional<int64_t> window, bool need_weights) {
  return AttentionConfig{weight_q,  weight_k,       weight_v,  weight_c, bias_q,       bias_k,   bias_v,
                         memory,    memory_lengths, num_heads, window,   need_weights, past_keys, past_values};
}

template <class Cell>
RecurrentForward attention_forward(const Tensor& input, const std::vector<Tensor>& states, const Tensor& weight_ih,
                                   const Tensor& weight_hh, const OptTensor& bias_ih, const OptTensor& bias_hh,
                                   const OptTensor& weight_hr, const AttentionConfig& config,
                                   const OptTensor& lengths, bool reverse, bool training) {
  const auto op = op_name<Cell>("_attn_forward");
  const LayerShape shape = check_layer_forward(op.c_str(), Cell::kGates, input, named_states(states, kStateNames),
                                               weight_ih, weight_hh, bias_ih, bias_hh, weight_hr);
  check_attention(op.c_str(), Cell::kGates, shape, input, config);
  check_past_slots(op.c_str(), shape, input, config, reverse);
  check_sequence_lengths(op.c_str(), shape, input, lengths);
  return recurrent_forward<Cell>(input, states, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, lengths, reverse,
                                 training, &config);
}

template <class Cell>
RecurrentBackward attention_backward(const Tensor& grad_output, const std::vector<Tensor>& grad_finals,
                                     const OptTensor& grad_context, const Tensor& input,
                                     const std::vector<Tensor>& states, const Tensor& weight_ih,
                                     const Tensor& weight_hh, const OptTensor& weight_hr,
                                     const AttentionConfig& config, const Tensor& output,
                                     const Tensor& context, const Tensor& workspace,
                                     const Tensor& attention_workspace, const OptTensor& lengths, bool reverse) {
  const auto op = op_name<Cell>("_attn_backward");
  const LayerShape shape =
      check_layer_backward(op.c_str(), Cell::kGates, workspace_planes<Cell>(weight_hr.has_value()), grad_output,
                           named_states(grad_finals, kGradFinalNames), input, named_states(states, kStateNames),
                           weight_ih, weight_hh, weight_hr, output, workspace);
  check_attention(op.c_str(), Cell::kGates, shape, input, config);
  check_past_slots(op.c_str(), shape, input, config, reverse);
  check_attention_saved(op.c_str(), shape, input, config, context, attention_workspace, grad_context);
  check_sequence_lengths(op.c_str(), shape, input, lengths);
  const AttentionSaved saved{context, attention_workspace, grad_context ? *grad_context : Tensor()};
  return recurrent_backward<Cell>(grad_output, grad_finals, input, states, weight_ih, weight_hh, weight_hr, output,
                                  workspace, lengths, reverse, &config, &saved);
}

// The op signatures: LSTM carries (h, c), the other cells h alone.
using LstmForwardResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using SingleForwardResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using LstmBackwardResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                      Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using SingleBackwardResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                        Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

LstmForwardResult lstm_attn_forward(const Tensor& input, const Tensor& h0, const Tensor& c0, const Tensor& weight_ih,
                                    const Tensor& weight_hh, const OptTensor& bias_ih, const OptTensor& bias_hh,
                                    const OptTensor& weight_hr, const Tensor& weight_q, const OptTensor& bias_q,
                                    const Tensor& weight_k,
                                    const OptTensor& bias_k, const Tensor& weight_v, const OptTensor& bias_v,
                                    const Tensor& weight_c, const OptTensor& memory, const OptTensor& memory_lengths,
                                    const OptTensor& lengths, const OptTensor& past_keys,
                                    const OptTensor& past_values, int64_t num_heads, std::optional<int64_t> window,
                                    bool reverse, bool training, bool need_weights) {
  const auto config = make_config(weight_q, bias_q, weight_k, bias_k, weight_v, bias_v, weight_c, memory,
                                  memory_lengths, past_keys, past_values, num_heads, window, need_weights);
  auto r = attention_forward<LstmCell>(input, {h0, c0}, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, config,
                                       lengths, reverse, training);
  return {r.output, r.final_states[0], r.final_states[1], r.context, r.attention, r.workspace, r.attention_workspace};
}

template <class Cell>
SingleForwardResult single_state_attn_forward(const Tensor& input, const Tensor& h0, const Tensor& weight_ih,
                                              const Tensor& weight_hh, const OptTensor& bias_ih,
                                              const OptTensor& bias_hh, const Tensor& weight_q,
                                              const OptTensor& bias_q, const Tensor& weight_k,
                                              const OptTensor& bias_k, const Tensor& weight_v,
                                              const OptTensor& bias_v, const Tensor& weight_c,
                                              const OptTensor& memory, const OptTensor& memory_lengths,
                                              const OptTensor& lengths, const OptTensor& past_keys,
                                              const OptTensor& past_values, int64_t num_heads,
                                              std::optional<int64_t> window, bool reverse, bool training,
                                              bool need_weights) {
  const auto config = make_config(weight_q, bias_q, weight_k, bias_k, weight_v, bias_v, weight_c, memory,
                                  memory_lengths, past_keys, past_values, num_heads, window, need_weights);
  auto r = attention_forward<Cell>(input, {h0}, weight_ih, weight_hh, bias_ih, bias_hh, std::nullopt, config, lengths,
                                   reverse, training);
  return {r.output, r.final_states[0], r.context, r.attention, r.workspace, r.attention_workspace};
}

// The gradients after those of the states, in schema order (LSTM: then grad_weight_hr).
template <typename Tuple, typename... States>
Tuple backward_tuple(const RecurrentBackward& r, const States&... states) {
  auto common = std::make_tuple(r.grad_input, states..., r.grad_weight_ih, r.grad_weight_hh, r.grad_bias_ih,
                                r.grad_bias_hh, r.grad_weight_q, r.grad_bias_q, r.grad_weight_k, r.grad_bias_k,
                                r.grad_weight_v, r.grad_bias_v, r.grad_weight_c, r.grad_memory, r.grad_past_keys,
                                r.grad_past_values);
  if constexpr (std::tuple_size_v<Tuple> == std::tuple_size_v<decltype(common)>) {
    return common;
  } else {
    return std::tuple_cat(common, std::make_tuple(r.grad_weight_hr));
  }
}

LstmBackwardResult lstm_attn_backward(const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& grad_c_n,
                                      const OptTensor& grad_context, const Tensor& input, const Tensor& h0,
                                      const Tensor& c0, const Tensor& weight_ih, const Tensor& weight_hh,
                                      const OptTensor& weight_hr, const Tensor& weight_q, const Tensor& weight_k,
                                      const Tensor& weight_v,
                                      const Tensor& weight_c, const OptTensor& memory,
                                      const OptTensor& memory_lengths, const OptTensor& lengths,
                                      const OptTensor& past_keys, const OptTensor& past_values, const Tensor& output,
                                      const Tensor& context, const Tensor& workspace,
                                      const Tensor& attention_workspace, int64_t num_heads,
                                      std::optional<int64_t> window, bool reverse) {
  const auto config = make_config(weight_q, std::nullopt, weight_k, std::nullopt, weight_v, std::nullopt, weight_c,
                                  memory, memory_lengths, past_keys, past_values, num_heads, window, false);
  auto r = attention_backward<LstmCell>(grad_output, {grad_h_n, grad_c_n}, grad_context, input, {h0, c0}, weight_ih,
                                        weight_hh, weight_hr, config, output, context, workspace, attention_workspace,
                                        lengths, reverse);
  return backward_tuple<LstmBackwardResult>(r, r.grad_initial_states[0], r.grad_initial_states[1]);
}

template <class Cell>
SingleBackwardResult single_state_attn_backward(
    const Tensor& grad_output, const Tensor& grad_h_n, const OptTensor& grad_context, const Tensor& input,
    const Tensor& h0, const Tensor& weight_ih, const Tensor& weight_hh, const Tensor& weight_q, const Tensor& weight_k,
    const Tensor& weight_v, const Tensor& weight_c, const OptTensor& memory, const OptTensor& memory_lengths,
    const OptTensor& lengths, const OptTensor& past_keys, const OptTensor& past_values, const Tensor& output,
    const Tensor& context, const Tensor& workspace,
    const Tensor& attention_workspace, int64_t num_heads, std::optional<int64_t> window, bool reverse) {
  const auto config = make_config(weight_q, std::nullopt, weight_k, std::nullopt, weight_v, std::nullopt, weight_c,
                                  memory, memory_lengths, past_keys, past_values, num_heads, window, false);
  auto r = attention_backward<Cell>(grad_output, {grad_h_n}, grad_context, input, {h0}, weight_ih, weight_hh,
                                    std::nullopt, config, output, context, workspace, attention_workspace, lengths,
                                    reverse);
  return backward_tuple<SingleBackwardResult>(r, r.grad_initial_states[0]);
}

void register_attention_ops(torch::Library& m) {
  m.impl("lstm_attn_forward", &lstm_attn_forward);
  m.impl("lstm_attn_backward", &lstm_attn_backward);
  m.impl("gru_attn_forward", &single_state_attn_forward<GruCell>);
  m.impl("gru_attn_backward", &single_state_attn_backward<GruCell>);
  m.impl("rnn_tanh_attn_forward", &single_state_attn_forward<RnnTanhCell>);
  m.impl("rnn_tanh_attn_backward", &single_state_attn_backward<RnnTanhCell>);
  m.impl("rnn_relu_attn_forward", &single_state_attn_forward<RnnReluCell>);
  m.impl("rnn_relu_attn_backward", &single_state_attn_backward<RnnReluCell>);
}

}  // namespace

TORCH_LIBRARY_IMPL(rnnattn, CPU, m) { register_attention_ops(m); }

#ifdef RNNATTN_WITH_CUDA
TORCH_LIBRARY_IMPL(rnnattn, CUDA, m) { register_attention_ops(m); }
#endif

}  // namespace rnnattn
