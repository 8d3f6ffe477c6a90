#include "ops/argument_checks.h"

#include <c10/util/Exception.h>

namespace rnnattn {
namespace {

using at::Tensor;

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
    TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble, op,
                     ": input must be float32 or float64 on the CPU, got ", dtype);
  } else {
    TORCH_CHECK_VALUE(input.is_cuda(), op, ": input must be on the CPU or a CUDA device, got ", input.device());
    TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
                     op, ": input must be float16, bfloat16, float32 or float64 on CUDA, got ", dtype);
  }
}

}  // namespace

LayerShape check_layer_forward(const char* op, int gates, const Tensor& input, const std::vector<NamedTensor>& states,
                               const Tensor& weight_ih, const Tensor& weight_hh, const std::optional<Tensor>& bias_ih,
                               const std::optional<Tensor>& bias_hh) {
  TORCH_CHECK_VALUE(input.defined(), op, ": input must be a tensor, got None");
  TORCH_CHECK_VALUE(input.dim() == 3, op, ": input must be 3-D (T, B, I), got shape ", input.sizes());
  check_dtype_supported(op, input);
  TORCH_CHECK_VALUE(weight_hh.dim() == 2, op, ": weight_hh must be 2-D (", gates, "*H, H), got shape ",
                    weight_hh.sizes());
  const int64_t H = weight_hh.size(1);
  const LayerShape shape{input.size(0), input.size(1), input.size(2), H};
  TORCH_CHECK_VALUE(H > 0, op, ": hidden size (weight_hh.size(1)) must be positive, got ", H);
  check_shape(op, "weight_hh", weight_hh, {gates * H, H}, "(G*H, H)");
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
  for (const auto& s : states) {
    check_shape(op, s.name, s.tensor, {shape.batch, H}, "(B, H)");
    check_same_kind(op, s.name, s.tensor, input);
  }
  return shape;
}

void check_layer_backward(const char* op, int gates, int workspace_planes, const Tensor& grad_output,
                          const std::vector<NamedTensor>& grad_states, const Tensor& input,
                          const std::vector<NamedTensor>& states, const Tensor& weight_ih, const Tensor& weight_hh,
                          const Tensor& output, const Tensor& workspace) {
  const LayerShape s = check_layer_forward(op, gates, input, states, weight_ih, weight_hh, std::nullopt, std::nullopt);
  check_shape(op, "output", output, {s.steps, s.batch, s.hidden_size}, "(T, B, H)");
  check_same_kind(op, "output", output, input);
  check_shape(op, "grad_output", grad_output, {s.steps, s.batch, s.hidden_size}, "(T, B, H)");
  check_same_kind(op, "grad_output", grad_output, input);
  for (const auto& g : grad_states) {
    check_shape(op, g.name, g.tensor, {s.batch, s.hidden_size}, "(B, H)");
    check_same_kind(op, g.name, g.tensor, input);
  }
  const std::vector<int64_t> expected{s.steps, workspace_planes, s.batch, s.hidden_size};
  TORCH_CHECK_VALUE(workspace.sizes() == at::IntArrayRef(expected) || (workspace.numel() == 0 && s.steps * s.batch == 0),
                    op, ": workspace must have shape (T, planes, B, H) = ", at::IntArrayRef(expected), ", got ",
                    workspace.sizes(),
                    workspace.numel() == 0 ? " (empty: the forward ran with training=False, which saves nothing "
                                             "for backward; run it with training=True)"
                                           : "");
  check_same_kind(op, "workspace", workspace, input);
}

}  // namespace rnnattn
