// Argument validation for the ops, run before any indexing so that calling torch.ops.rnnattn.*
// directly is as safe as the modules. Messages name the op, the argument, the expected and the
// actual value; shape errors raise ValueError, dtype errors TypeError.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "engine/recurrent_engine.h"

namespace rnnattn {

struct NamedTensor {
  const char* name;
  const at::Tensor& tensor;
};

struct LayerShape {
  int64_t steps, batch, input_size, hidden_size;
  int64_t state_size;  // width of h and the output: the projection's P, else hidden_size
};

// Checks input (T, B, I), states (B, H), weight_ih (G*H, I), weight_hh (G*H, H), biases (G*H),
// common dtype and device; returns the sizes. With weight_hr (P, H) (the LSTM projection), h (the
// first state) is (B, P) and weight_hh (G*H, P).
LayerShape check_layer_forward(const char* op, int gates, const at::Tensor& input,
                               const std::vector<NamedTensor>& states, const at::Tensor& weight_ih,
                               const at::Tensor& weight_hh, const std::optional<at::Tensor>& bias_ih,
                               const std::optional<at::Tensor>& bias_hh,
                               const std::optional<at::Tensor>& weight_hr = std::nullopt);

// The smallest and largest of a non-empty int64 tensor's values: read in place on the CPU (a
// reduction and its .item() per bound cost more than a small layer's step), by min and max elsewhere.
std::pair<int64_t, int64_t> value_range(const at::Tensor& values);

// Checks the variable lengths, when given: (B,) int64 on the device of input, values in [1, T].
void check_sequence_lengths(const char* op, const LayerShape& shape, const at::Tensor& input,
                            const std::optional<at::Tensor>& lengths);

// Checks what backward adds: gradients of the outputs, the forward's output and its workspace;
// returns the sizes.
LayerShape check_layer_backward(const char* op, int gates, int workspace_planes, const at::Tensor& grad_output,
                                const std::vector<NamedTensor>& grad_states, const at::Tensor& input,
                                const std::vector<NamedTensor>& states, const at::Tensor& weight_ih,
                                const at::Tensor& weight_hh, const std::optional<at::Tensor>& weight_hr,
                                const at::Tensor& output, const at::Tensor& workspace);

// Checks the attention cell's parameters against the layer: weight_q (D, H), weight_k and weight_v
// (D, M) (self memory: M = H; H is the projection's P with one), biases (D,), weight_c (G*H, D), num_heads dividing D, window >= 1 (self memory only),
// memory (S, B, M) with S >= 1 and memory_lengths (B,) int64 in [1, S] on the device of memory.
void check_attention(const char* op, int gates, const LayerShape& shape, const at::Tensor& input,
                     const AttentionConfig& attention);

// Checks the self memory's past slots (streaming), when given: past_keys and past_values (P, B, D)
// together, self memory, forward direction.
void check_past_slots(const char* op, const LayerShape& shape, const at::Tensor& input,
                      const AttentionConfig& attention, bool reverse);

// Checks what the attention backward adds: the forward's context and attention workspace, and the
// context's gradient when given.
void check_attention_saved(const char* op, const LayerShape& shape, const at::Tensor& input,
                           const AttentionConfig& attention, const at::Tensor& context,
                           const at::Tensor& attention_workspace, const std::optional<at::Tensor>& grad_context);

}  // namespace rnnattn
