// The time loop shared by every cell and both devices: GEMMs through ATen (MKL/cuBLAS on the
// current stream), one pointwise pass per step from csrc/cells, large GEMMs after the backward loop.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace rnnattn {

// A rows x cols matrix inside a tensor's data, columns contiguous: element (r, c) at
// data[offset + r * ld + c]. The CPU kernels read the raw pointer; ATen gets a view.
struct Operand {
  const at::Tensor& base;
  int64_t offset, rows, cols, ld;
  template <typename T>
  T* data() const {
    return reinterpret_cast<T*>(base.data_ptr()) + offset;
  }
  void* address() const { return static_cast<char*>(base.data_ptr()) + offset * base.element_size(); }
  at::Tensor view() const { return base.as_strided({rows, cols}, {ld, 1}, base.storage_offset() + offset); }
};

// The attention stage of the attention-augmented cell (SPEC): its parameters and memory. The engine
// runs it inside the same time loop as the base cell: the query (and, for self memory, the key and
// value of the new slot) come out of the recurrent GEMM as extra rows next to W_hh; W_c ctx joins the
// input side of the cell's pointwise pass.
struct AttentionConfig {
  at::Tensor weight_q, weight_k, weight_v, weight_c;  // (D, H), (D, M), (D, M), (G*H, D)
  std::optional<at::Tensor> bias_q, bias_k, bias_v;
  std::optional<at::Tensor> memory;          // external memory (S, B, M); none: self memory (M = H)
  std::optional<at::Tensor> memory_lengths;  // (B,) int64 on the device of memory
  int64_t num_heads = 1;
  std::optional<int64_t> window;  // self memory: the w most recent states; none: all of them
  bool need_weights = false;
  // Self memory, streaming: keys and values (P, B, D) of the slots before this call's first step
  // (oldest first), which the call's steps read as if they had come before them in one sequence.
  std::optional<at::Tensor> past_keys, past_values;
  // External memory: its keys and values (B, S, D) when the caller has them (external_keys_values),
  // used instead of computing them again (a streamer makes them once for all its steps).
  std::optional<at::Tensor> memory_keys, memory_values;
  // Self memory, streaming inference: a slot store the caller keeps from one call to the next, read
  // and written in place instead of past_keys/past_values (nothing copied in or out): keys and values
  // (B, C, D) each, contiguous, in the input's dtype and on its device. Each row's past slots are
  // [store_first, store_first + store_past), oldest first; the call writes its new slots after them
  // (store_first + store_past + T <= C).
  std::optional<at::Tensor> store_keys, store_values;
  int64_t store_first = 0, store_past = 0;
};

// What the attention forward saved, and the gradient of its context output (may be undefined).
struct AttentionSaved {
  at::Tensor context;    // (T, B, D)
  at::Tensor workspace;  // flat: queries (T, B, D), then keys and values (slots, B, D) each
  at::Tensor grad_context;
};

struct RecurrentForward {
  at::Tensor output;                     // (T, B, H), or (T, B, P) with a projection
  std::vector<at::Tensor> final_states;  // kStates tensors of (B, H) (h: (B, P) with a projection)
  at::Tensor workspace;                  // (T, planes, B, H) when training, else empty
  // Attention cell only.
  at::Tensor context;              // (T, B, D)
  at::Tensor attention;            // (T, B, heads, slots) when requested, else empty
  at::Tensor attention_workspace;  // when training, else empty
};

struct RecurrentBackward {
  at::Tensor grad_input;
  std::vector<at::Tensor> grad_initial_states;
  at::Tensor grad_weight_ih, grad_weight_hh, grad_bias_ih, grad_bias_hh;
  at::Tensor grad_weight_hr;  // with a projection, else empty
  // Attention cell only (grad_memory empty for self memory; the past slots' gradients (P, B, D)).
  at::Tensor grad_weight_q, grad_bias_q, grad_weight_k, grad_bias_k, grad_weight_v, grad_bias_v, grad_weight_c,
      grad_memory, grad_past_keys, grad_past_values;
};

// Workspace planes per step: the cell's saved activations plus its states other than h, and with a
// projection the cell's unprojected output m_t (dW_hr reads it).
template <class Cell>
constexpr int workspace_planes(bool projected = false) {
  return Cell::kSaved + Cell::kStates - 1 + (projected ? 1 : 0);
}

// The workspace's dtype: float32 for a float16 or bfloat16 input on the CPU, whose loop computes in
// float32 (the backward reads the saved gates and cell states as they were computed, and neither
// pass converts them), else the input's.
inline at::ScalarType workspace_dtype(const at::Tensor& input) {
  const at::ScalarType dtype = input.scalar_type();
  return input.is_cpu() && (dtype == at::kHalf || dtype == at::kBFloat16) ? at::kFloat : dtype;
}

// Arguments are checked by the caller (csrc/ops); the engine trusts shapes, dtypes and devices.
// `lengths` (B,) int64 on the input's device, values in [1, T]: variable lengths (SPEC); rows past
// their length are held, their outputs zero, their final states those after their last valid step.
// `weight_hr` (P, H): the LSTM projection (torch.nn's proj_size): the state h and the output are
// y_t = W_hr m_t, m_t the cell's own output; weight_hh (and the attention's recurrent-side
// weights) then have P columns.
template <class Cell>
RecurrentForward recurrent_forward(const at::Tensor& input, const std::vector<at::Tensor>& initial_states,
                                   const at::Tensor& weight_ih, const at::Tensor& weight_hh,
                                   const std::optional<at::Tensor>& bias_ih,
                                   const std::optional<at::Tensor>& bias_hh,
                                   const std::optional<at::Tensor>& weight_hr,
                                   const std::optional<at::Tensor>& lengths, bool reverse, bool training,
                                   const AttentionConfig* attention = nullptr);

template <class Cell>
RecurrentBackward recurrent_backward(const at::Tensor& grad_output, const std::vector<at::Tensor>& grad_final_states,
                                     const at::Tensor& input, const std::vector<at::Tensor>& initial_states,
                                     const at::Tensor& weight_ih, const at::Tensor& weight_hh,
                                     const std::optional<at::Tensor>& weight_hr,
                                     const at::Tensor& output, const at::Tensor& workspace,
                                     const std::optional<at::Tensor>& lengths, bool reverse,
                                     const AttentionConfig* attention = nullptr,
                                     const AttentionSaved* attention_saved = nullptr);

// The keys and values (B, S, D) of an external memory, written into `keys` and `values` (contiguous):
// memory rows through W_k and W_v (and their biases), as every call that is given the memory makes them.
void external_keys_values(const AttentionConfig& attention, const at::Tensor& keys, const at::Tensor& values);

// out = input @ weight^T (+ bias), input (rows, k) and out (rows, n), as the engine's per-step
// products compute it: a few float rows on the CPU read the weight in place, the rest goes through
// ATen. For a small product next to an op call (a streaming call's carried slots), where
// at::linear's dispatch and the views of its operands would cost more than the product. Records no
// autograd history.
void linear_into(const Operand& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                 const Operand& out);

}  // namespace rnnattn
