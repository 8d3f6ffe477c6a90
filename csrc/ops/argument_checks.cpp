#include "ops/argument_checks.h"

#include <c10/util/Exception.h>

#include <algorithm>

namespace rnnattn {
namespace {

using at::Tensor;

// What an empty workspace in a backward means, and where it comes from.
constexpr const char* kEmptyWorkspace =
    " (empty: the forward ran with training=False, which saves nothing for backward; run it with training=True. "
    "A torch.jit.trace of a module in eval mode, or with no tensor requiring grad, records training=False: "
    "trace it in train mode to train through the trace)";

void check_shape(const char* op, const char* name, const Tensor& t, at::IntArrayRef expected,
                 const char* meaning) {
  TORCH_CHECK_VALUE(t.sizes() == expected, op, ": ", name, " must have shape ", meaning, " = ", expected,
                    ", got ", t.sizes());
}

void check_same_kind(const char* op, const char* name, const Tensor& t, const Tensor& input) {
  TORCH_CHECK_TYPE(t.scalar_type() == input.scalar_type(), op, ": ", name, " must have the dtype of input (",
                   input.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == input.device(), op, ": ", name, " must be on the device of input (",
                    input.device(), "), got ", t.device());
}

void check_dtype_supported(const char* op, const Tensor& input) {
  const auto dtype = input.scalar_type();
  if (input.is_cpu()) {
    // float16 and bfloat16 compute in float32 there (recurrent_engine.cpp), the attention cell's aside.
    TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, op,
                     ": input must be float16, bfloat16, float32 or float64 on the CPU, got ", dtype);
  } else {
    TORCH_CHECK_VALUE(input.is_cuda(), op, ": input must be on the CPU or a CUDA device, got ", input.device());
    TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
                     op, ": input must be float16, bfloat16, float32 or float64 on CUDA, got ", dtype);
  }
}

// lengths-like argument: (B,) int64 on `device`, every value in [1, limit] (limit named by limit_name).
void check_lengths_values(const char* op, const char* name, const Tensor& lengths, int64_t batch,
                          const at::Device& device, const char* device_owner, int64_t limit, const char* limit_name) {
  TORCH_CHECK_TYPE(lengths.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ", lengths.scalar_type());
  TORCH_CHECK_VALUE(lengths.device() == device, op, ": ", name, " must be on the device of ", device_owner, " (",
                    device, "), got ", lengths.device());
  check_shape(op, name, lengths, {batch}, "(B,)");
  if (lengths.numel() > 0) {
    const auto [low, high] = value_range(lengths);
    TORCH_CHECK_VALUE(low >= 1 && high <= limit, op, ": ", name, " must lie in [1, ", limit_name, "] = [1, ", limit,
                      "], got values in [", low, ", ", high, "]");
  }
}

}  // namespace

std::pair<int64_t, int64_t> value_range(const Tensor& values) {
  TORCH_INTERNAL_ASSERT(values.scalar_type() == at::kLong && values.numel() > 0);
  if (!values.is_cpu()) return {values.min().item<int64_t>(), values.max().item<int64_t>()};
  const Tensor dense = values.contiguous();
  const int64_t* v = dense.const_data_ptr<int64_t>();
  int64_t low = v[0], high = v[0];
  for (int64_t i = 1; i < dense.numel(); ++i) {
    low = std::min(low, v[i]);
    high = std::max(high, v[i]);
  }
  return {low, high};
}

void check_sequence_lengths(const char* op, const LayerShape& shape, const Tensor& input,
                            const std::optional<Tensor>& lengths) {
  if (lengths) check_lengths_values(op, "lengths", *lengths, shape.batch, input.device(), "input", shape.steps, "T");
}

LayerShape check_layer_forward(const char* op, int gates, const Tensor& input, const std::vector<NamedTensor>& states,
                               const Tensor& weight_ih, const Tensor& weight_hh, const std::optional<Tensor>& bias_ih,
                               const std::optional<Tensor>& bias_hh, const std::optional<Tensor>& weight_hr) {
  TORCH_CHECK_VALUE(input.defined(), op, ": input must be a tensor, got None");
  TORCH_CHECK_VALUE(input.dim() == 3, op, ": input must be 3-D (T, B, I), got shape ", input.sizes());
  // As torch.nn: a sequence has at least one step (B = 0 is fine: an empty batch).
  TORCH_CHECK_VALUE(input.size(0) >= 1, op, ": input must have at least one time step (T >= 1), got shape ",
                    input.sizes());
  check_dtype_supported(op, input);
  int64_t H = 0, P = 0;
  if (weight_hr) {
    TORCH_CHECK_VALUE(weight_hr->dim() == 2, op, ": weight_hr must be 2-D (P, H), got shape ", weight_hr->sizes());
    P = weight_hr->size(0);
    H = weight_hr->size(1);
    TORCH_CHECK_VALUE(P > 0 && H > 0, op, ": weight_hr must have shape (P, H) with P, H > 0, got ", weight_hr->sizes());
    check_same_kind(op, "weight_hr", *weight_hr, input);
    check_shape(op, "weight_hh", weight_hh, {gates * H, P}, "(G*H, P) with (P, H) = weight_hr.shape");
  } else {
    TORCH_CHECK_VALUE(weight_hh.dim() == 2, op, ": weight_hh must be 2-D (", gates, "*H, H), got shape ",
                      weight_hh.sizes());
    H = P = weight_hh.size(1);
    TORCH_CHECK_VALUE(H > 0, op, ": hidden size (weight_hh.size(1)) must be positive, got ", H);
    check_shape(op, "weight_hh", weight_hh, {gates * H, H}, "(G*H, H)");
  }
  const LayerShape shape{input.size(0), input.size(1), input.size(2), H, P};
  check_same_kind(op, "weight_hh", weight_hh, input);
  check_shape(op, "weight_ih", weight_ih, {gates * H, shape.input_size}, "(G*H, I)");
  check_same_kind(op, "weight_ih", weight_ih, input);
  if (bias_ih) {
    check_shape(op, "bias_ih", *bias_ih, {gates * H}, "(G*H,)");
    check_same_kind(op, "bias_ih", *bias_ih, input);
  }
  if (bias_hh) {
    check_shape(op, "bias_hh", *bias_hh, {gates * H}, "(G*H,)");
    check_same_kind(op, "bias_hh", *bias_hh, input);
  }
  for (size_t i = 0; i < states.size(); ++i) {
    const bool h = i == 0;  // the projection's P is the width of h alone
    check_shape(op, states[i].name, states[i].tensor, {shape.batch, h ? P : H}, h && weight_hr ? "(B, P)" : "(B, H)");
    check_same_kind(op, states[i].name, states[i].tensor, input);
  }
  return shape;
}

LayerShape check_layer_backward(const char* op, int gates, int workspace_planes, const Tensor& grad_output,
                                const std::vector<NamedTensor>& grad_states, const Tensor& input,
                                const std::vector<NamedTensor>& states, const Tensor& weight_ih,
                                const Tensor& weight_hh, const std::optional<Tensor>& weight_hr,
                                const Tensor& output, const Tensor& workspace) {
  const LayerShape s =
      check_layer_forward(op, gates, input, states, weight_ih, weight_hh, std::nullopt, std::nullopt, weight_hr);
  const char* out_meaning = weight_hr ? "(T, B, P)" : "(T, B, H)";
  check_shape(op, "output", output, {s.steps, s.batch, s.state_size}, out_meaning);
  check_same_kind(op, "output", output, input);
  check_shape(op, "grad_output", grad_output, {s.steps, s.batch, s.state_size}, out_meaning);
  check_same_kind(op, "grad_output", grad_output, input);
  for (size_t i = 0; i < grad_states.size(); ++i) {
    const bool h = i == 0;
    check_shape(op, grad_states[i].name, grad_states[i].tensor, {s.batch, h ? s.state_size : s.hidden_size},
                h && weight_hr ? "(B, P)" : "(B, H)");
    check_same_kind(op, grad_states[i].name, grad_states[i].tensor, input);
  }
  const std::vector<int64_t> expected{s.steps, workspace_planes, s.batch, s.hidden_size};
  TORCH_CHECK_VALUE(workspace.sizes() == at::IntArrayRef(expected) || (workspace.numel() == 0 && s.steps * s.batch == 0),
                    op, ": workspace must have shape (T, planes, B, H) = ", at::IntArrayRef(expected), ", got ",
                    workspace.sizes(),
                    workspace.numel() == 0 ? kEmptyWorkspace : "");
  TORCH_CHECK_TYPE(workspace.scalar_type() == workspace_dtype(input), op, ": workspace must be ",
                   workspace_dtype(input), " for input of ", input.scalar_type(), " on ", input.device().type(),
                   " (what the forward returns), got ", workspace.scalar_type());
  TORCH_CHECK_VALUE(workspace.device() == input.device(), op, ": workspace must be on the device of input (",
                    input.device(), "), got ", workspace.device());
  return s;
}

void check_attention(const char* op, int gates, const LayerShape& shape, const Tensor& input,
                     const AttentionConfig& a) {
  // The query, and the self memory's keys and values, read h: its width is the projection's P.
  const int64_t H = shape.hidden_size, HS = shape.state_size;
  const bool projected = HS != H;  // only for the messages: P = H reads the same
  const auto dtype = input.scalar_type();
  TORCH_CHECK_TYPE(!input.is_cpu() || dtype == at::kFloat || dtype == at::kDouble, op,
                   ": input must be float32 or float64 on the CPU (the attention modules and functional.attention_layer "
                   "compute float16 and bfloat16 in float32 there), got ", dtype);
  TORCH_CHECK_VALUE(a.weight_q.dim() == 2, op, ": weight_q must be 2-D (D, H), got shape ", a.weight_q.sizes());
  const int64_t D = a.weight_q.size(0);
  TORCH_CHECK_VALUE(D > 0, op, ": the attention width D = weight_q.size(0) must be positive, got ", D);
  check_shape(op, "weight_q", a.weight_q, {D, HS}, projected ? "(D, P)" : "(D, H)");
  check_same_kind(op, "weight_q", a.weight_q, input);
  TORCH_CHECK_VALUE(a.num_heads >= 1, op, ": num_heads must be >= 1, got ", a.num_heads);
  TORCH_CHECK_VALUE(D % a.num_heads == 0, op, ": num_heads must divide the attention width D = weight_q.size(0) = ", D,
                    ", got num_heads = ", a.num_heads);
  int64_t M = HS;
  if (a.memory) {
    const Tensor& memory = *a.memory;
    TORCH_CHECK_VALUE(memory.dim() == 3, op, ": memory must be 3-D (S, B, M), got shape ", memory.sizes());
    check_same_kind(op, "memory", memory, input);
    TORCH_CHECK_VALUE(memory.size(1) == shape.batch, op, ": memory must have shape (S, B, M) with B = ", shape.batch,
                      " (the batch of input), got ", memory.sizes());
    TORCH_CHECK_VALUE(memory.size(0) >= 1 || shape.batch == 0, op,
                      ": memory must have at least one position (S >= 1), got shape ", memory.sizes());
    M = memory.size(2);
    TORCH_CHECK_VALUE(!a.window, op, ": window applies to self memory only (memory=None), got window = ", *a.window,
                      " with an external memory");
    if (a.memory_lengths) {
      check_lengths_values(op, "memory_lengths", *a.memory_lengths, shape.batch, memory.device(), "memory",
                           memory.size(0), "S");
    }
  } else {
    TORCH_CHECK_VALUE(!a.memory_lengths, op, ": memory_lengths needs an external memory, got memory=None");
    TORCH_CHECK_VALUE(!a.window || *a.window >= 1, op, ": window must be >= 1 or None (unbounded), got ", *a.window);
  }
  const char* self_meaning = projected ? "(D, P)" : "(D, H)";
  check_shape(op, "weight_k", a.weight_k, {D, M}, a.memory ? "(D, M) with M = memory.size(2)" : self_meaning);
  check_same_kind(op, "weight_k", a.weight_k, input);
  check_shape(op, "weight_v", a.weight_v, {D, M}, a.memory ? "(D, M) with M = memory.size(2)" : self_meaning);
  check_same_kind(op, "weight_v", a.weight_v, input);
  check_shape(op, "weight_c", a.weight_c, {gates * H, D}, "(G*H, D)");
  check_same_kind(op, "weight_c", a.weight_c, input);
  const std::pair<const char*, const std::optional<Tensor>*> biases[] = {
      {"bias_q", &a.bias_q}, {"bias_k", &a.bias_k}, {"bias_v", &a.bias_v}};
  for (const auto& [name, bias] : biases) {
    if (*bias) {
      check_shape(op, name, **bias, {D}, "(D,)");
      check_same_kind(op, name, **bias, input);
    }
  }
}

void check_attention_saved(const char* op, const LayerShape& shape, const Tensor& input, const AttentionConfig& a,
                           const Tensor& context, const Tensor& attention_workspace,
                           const std::optional<Tensor>& grad_context) {
  const int64_t D = a.weight_q.size(0);
  check_shape(op, "context", context, {shape.steps, shape.batch, D}, "(T, B, D)");
  check_same_kind(op, "context", context, input);
  if (grad_context) {
    check_shape(op, "grad_context", *grad_context, {shape.steps, shape.batch, D}, "(T, B, D)");
    check_same_kind(op, "grad_context", *grad_context, input);
  }
  const int64_t slots = a.memory ? a.memory->size(0) : shape.steps + (a.past_keys ? a.past_keys->size(0) : 0);
  const int64_t expected = (shape.steps + 2 * slots) * shape.batch * D;
  TORCH_CHECK_VALUE(attention_workspace.dim() == 1 && attention_workspace.numel() == expected, op,
                    ": attention_workspace must be 1-D with (T + 2 * slots) * B * D = ", expected, " elements, got shape ",
                    attention_workspace.sizes(),
                    attention_workspace.numel() == 0 && expected != 0 ? kEmptyWorkspace : "");
  check_same_kind(op, "attention_workspace", attention_workspace, input);
}

void check_past_slots(const char* op, const LayerShape& shape, const Tensor& input, const AttentionConfig& a,
                      bool reverse) {
  if (!a.past_keys && !a.past_values) return;
  TORCH_CHECK_VALUE(a.past_keys && a.past_values, op, ": past_keys and past_values come together, got only ",
                    a.past_keys ? "past_keys" : "past_values");
  TORCH_CHECK_VALUE(!a.memory, op, ": past_keys and past_values are slots of the self memory, got an external memory");
  TORCH_CHECK_VALUE(!reverse, op, ": past_keys and past_values continue a sequence forward, got reverse=True");
  const int64_t D = a.weight_q.size(0);
  const Tensor& keys = *a.past_keys;
  TORCH_CHECK_VALUE(keys.dim() == 3, op, ": past_keys must be 3-D (P, B, D), got shape ", keys.sizes());
  check_shape(op, "past_keys", keys, {keys.size(0), shape.batch, D}, "(P, B, D)");
  check_same_kind(op, "past_keys", keys, input);
  check_shape(op, "past_values", *a.past_values, keys.sizes(), "(P, B, D) like past_keys");
  check_same_kind(op, "past_values", *a.past_values, input);
}

}  // namespace rnnattn
