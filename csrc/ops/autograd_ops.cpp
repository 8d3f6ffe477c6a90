// Autograd of every op, in C++ (the Autograd dispatch key), so that a call costs no Python: torch's
// Python autograd kernel of a custom op cost ~18 µs per call under no_grad and ~80 µs per call with
// gradients, more than a short call's arithmetic. It also lets C++ programs that only load the
// library (libtorch, TorchScript) train, not just infer.
//
// Forward ops: their backward op is `<name>_backward` (for `<name>_forward`), and the two schemas
// say, by name, how one feeds the other (schemas.cpp): a backward argument `grad_X` is the gradient of
// the forward's output X (zeros when X got none); any other backward argument is the forward's
// argument or output of that name, saved for backward; a backward return `grad_X` is the gradient of
// the forward's argument X. Forward outputs without a `grad_X` argument (workspaces, attention
// weights) carry no gradient; forward arguments without a `grad_X` return (lengths, flags) get none.
// So one generic kernel serves every cell, and a new cell's ops are differentiable by their schemas.
//
// Backward ops: not differentiable (no double backward). Their kernel attaches a node that raises if
// a second-order gradient reaches them, where torch's fallback would only warn and return zeros.
//
// Under torch.func's transforms (grad, vjp, jacrev, vmap over them) torch refuses a C++
// torch::autograd::Function, so there the graph gets a plain autograd node (TransformedOpGradient),
// as ATen's own ops do; both nodes run the backward op the same way (call_backward). Neither has a
// forward-mode gradient: an input carrying a tangent (torch.func.jvp, torch.autograd.forward_ad)
// raises, where the call would otherwise return a tangent of zeros (the modules and
// rnnattn_ext.functional run plain torch operations instead when a tangent comes in).
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include "ops/op_names.h"

namespace rnnattn {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// How a forward op and its backward op connect, read once from their schemas.
struct GradientPlan {
  // Where one argument of the backward op comes from.
  struct Source {
    enum Kind { kOutputGradient, kSavedTensor, kSavedValue } kind;
    size_t index;  // into the incoming gradients, the saved tensors, or the forward's arguments
  };

  std::string forward_name;
  std::optional<c10::OperatorHandle> backward;
  size_t num_arguments = 0, num_returns = 0;
  std::vector<std::string> argument_names;
  std::vector<size_t> differentiable_arguments;  // forward argument indices with a gradient
  std::vector<size_t> gradient_return;           // per forward argument: its gradient's backward return
  std::vector<size_t> differentiable_outputs;    // forward return indices with a gradient, in order
  std::vector<size_t> saved_arguments;           // tensor arguments backward reads (saved first)
  std::vector<size_t> saved_outputs;             // outputs backward reads (saved after them)
  std::vector<size_t> saved_values;              // non-tensor arguments backward reads
  std::vector<Source> backward_arguments;
};

std::optional<size_t> index_of(const std::vector<c10::Argument>& list, const std::string& name) {
  for (size_t i = 0; i < list.size(); ++i) {
    if (list[i].name() == name) return i;
  }
  return std::nullopt;
}

std::optional<size_t> position_in(const std::vector<size_t>& list, size_t value) {
  for (size_t i = 0; i < list.size(); ++i) {
    if (list[i] == value) return i;
  }
  return std::nullopt;
}

bool is_tensor_type(const c10::Argument& argument) {
  const c10::TypePtr& type = argument.type();
  if (type->kind() == c10::TypeKind::OptionalType) {
    return type->castRaw<c10::OptionalType>()->getElementType()->kind() == c10::TypeKind::TensorType;
  }
  return type->kind() == c10::TypeKind::TensorType;
}

GradientPlan make_plan(const c10::OperatorHandle& forward_op) {
  const c10::FunctionSchema& forward = forward_op.schema();
  GradientPlan plan;
  plan.forward_name = forward.name();
  plan.backward = c10::Dispatcher::singleton().findSchemaOrThrow(backward_op_name(forward.name()).c_str(), "");
  const c10::FunctionSchema& backward = plan.backward->schema();
  const auto& arguments = forward.arguments();
  const auto& returns = forward.returns();
  plan.num_arguments = arguments.size();
  plan.num_returns = returns.size();
  for (const auto& a : arguments) plan.argument_names.push_back(a.name());

  plan.gradient_return.assign(arguments.size(), 0);
  for (size_t i = 0; i < arguments.size(); ++i) {
    if (auto r = index_of(backward.returns(), "grad_" + arguments[i].name())) {
      plan.differentiable_arguments.push_back(i);
      plan.gradient_return[i] = *r;
    }
  }
  for (size_t i = 0; i < returns.size(); ++i) {
    if (index_of(backward.arguments(), "grad_" + returns[i].name())) plan.differentiable_outputs.push_back(i);
  }

  std::vector<size_t> output_sources;  // the backward arguments that are saved outputs
  for (const auto& b : backward.arguments()) {
    const std::string& name = b.name();
    if (name.rfind("grad_", 0) == 0) {
      const auto output = index_of(returns, name.substr(5));
      TORCH_INTERNAL_ASSERT(output, plan.forward_name, " has no output for the backward's ", name);
      plan.backward_arguments.push_back({GradientPlan::Source::kOutputGradient,
                                         *position_in(plan.differentiable_outputs, *output)});
    } else if (const auto argument = index_of(arguments, name)) {
      if (is_tensor_type(arguments[*argument])) {
        plan.backward_arguments.push_back({GradientPlan::Source::kSavedTensor, plan.saved_arguments.size()});
        plan.saved_arguments.push_back(*argument);
      } else {
        plan.backward_arguments.push_back({GradientPlan::Source::kSavedValue, *argument});
        plan.saved_values.push_back(*argument);
      }
    } else {
      const auto output = index_of(returns, name);
      TORCH_INTERNAL_ASSERT(output, plan.forward_name, " has no argument or output for the backward's ", name);
      plan.backward_arguments.push_back({GradientPlan::Source::kSavedTensor, 0});  // index set below
      plan.saved_outputs.push_back(*output);
      output_sources.push_back(plan.backward_arguments.size() - 1);
    }
  }
  // Saved tensors are the arguments, then the outputs: point the outputs' sources past the arguments.
  size_t next_output = plan.saved_arguments.size();
  for (size_t source : output_sources) plan.backward_arguments[source].index = next_output++;
  return plan;
}

// Every differentiable op's plan, built on first use (every schema is registered by then).
const GradientPlan& plan_for(const std::string& forward_name) {
  static const std::unordered_map<std::string, GradientPlan> plans = [] {
    std::unordered_map<std::string, GradientPlan> all;
    for (const std::string& name : forward_op_names()) {
      const std::string qualified = "rnnattn::" + name;
      all.emplace(qualified, make_plan(c10::Dispatcher::singleton().findSchemaOrThrow(qualified.c_str(), "")));
    }
    return all;
  }();
  const auto found = plans.find(forward_name);
  TORCH_INTERNAL_ASSERT(found != plans.end(), "no gradient plan for ", forward_name);
  return found->second;
}

// What the autograd kernel hands to the function: the call to make below autograd.
struct PendingCall {
  const GradientPlan& plan;
  const c10::OperatorHandle& op;
  c10::DispatchKeySet keys;
  torch::jit::Stack& stack;
  std::vector<int64_t> gradient_arguments;  // forward argument index of each tensor given a gradient
};

const char* const kOpKey = "op";
const char* const kGradientArgumentsKey = "gradient_arguments";

using SavedValues = decltype(AutogradContext::saved_data);

// What backward needs besides tensors: the forward's non-tensor arguments it reads, the op's name and the
// forward arguments given a gradient.
void save_values(const GradientPlan& plan, torch::jit::Stack::const_iterator arguments,
                 std::vector<int64_t> gradient_arguments, SavedValues& saved_data) {
  for (size_t k : plan.saved_values) saved_data[plan.argument_names[k]] = arguments[static_cast<std::ptrdiff_t>(k)];
  saved_data[kOpKey] = plan.forward_name;
  saved_data[kGradientArgumentsKey] = std::move(gradient_arguments);
}

// Runs the backward op on the gradients of the differentiable outputs (zeros for those that got none),
// the saved tensors (arguments, then outputs; undefined for an absent optional argument) and values;
// returns the gradients of the arguments listed under kGradientArgumentsKey, in that order.
variable_list call_backward(const GradientPlan& plan, const variable_list& saved, const SavedValues& saved_data,
                            const variable_list& output_gradients) {
  torch::jit::Stack stack;
  stack.reserve(plan.backward_arguments.size());
  for (const auto& source : plan.backward_arguments) {
    switch (source.kind) {
      case GradientPlan::Source::kOutputGradient:
        stack.emplace_back(output_gradients[source.index]);
        break;
      case GradientPlan::Source::kSavedTensor:
        if (saved[source.index].defined()) {
          stack.emplace_back(saved[source.index]);
        } else {
          stack.emplace_back();  // an absent optional argument
        }
        break;
      case GradientPlan::Source::kSavedValue:
        stack.push_back(saved_data.at(plan.argument_names[source.index]));
        break;
    }
  }
  plan.backward->callBoxed(&stack);
  variable_list gradients;
  for (int64_t k : saved_data.at(kGradientArgumentsKey).toIntVector()) {
    gradients.push_back(stack[plan.gradient_return[static_cast<size_t>(k)]].toTensor());
  }
  return gradients;
}

struct OpGradient : public torch::autograd::Function<OpGradient> {
  // The backward reads only its saved tensors and values: compiled autograd may trace it.
  static constexpr bool is_traceable = true;

  static variable_list forward(AutogradContext* ctx, at::TensorList /*gradient_inputs: the graph's edges*/,
                               PendingCall* call) {
    const GradientPlan& plan = call->plan;
    torch::jit::Stack& stack = call->stack;
    const auto arguments = stack.end() - static_cast<std::ptrdiff_t>(plan.num_arguments);
    variable_list saved;
    saved.reserve(plan.saved_arguments.size() + plan.saved_outputs.size());
    for (size_t k : plan.saved_arguments) {
      saved.push_back(arguments[k].isTensor() ? arguments[k].toTensor() : at::Tensor());  // None: undefined
    }
    save_values(plan, arguments, call->gradient_arguments, ctx->saved_data);
    {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      call->op.redispatchBoxed(call->keys & c10::after_ADInplaceOrView_keyset, &stack);
    }
    const auto returns = stack.end() - static_cast<std::ptrdiff_t>(plan.num_returns);
    for (size_t k : plan.saved_outputs) saved.push_back(returns[k].toTensor());
    ctx->save_for_backward(saved);
    variable_list outputs;
    outputs.reserve(plan.differentiable_outputs.size());
    for (size_t k : plan.differentiable_outputs) outputs.push_back(returns[k].toTensor());
    return outputs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list output_gradients) {
    const GradientPlan& plan = plan_for(ctx->saved_data.at(kOpKey).toStringRef());
    variable_list gradients = call_backward(plan, ctx->get_saved_variables(), ctx->saved_data, output_gradients);
    gradients.emplace_back();  // for the PendingCall argument
    return gradients;
  }
};

// torch owns autograd nodes by std::shared_ptr up to 2.12 and by c10::intrusive_ptr from 2.13 on.
constexpr bool kSharedNodes =
    std::is_same_v<decltype(std::declval<torch::autograd::Node&>().getptr()), std::shared_ptr<torch::autograd::Node>>;

template <typename NodeType, typename... Args>
auto make_node(Args&&... args) {
  if constexpr (kSharedNodes) {
    // deleteNode (found by argument-dependent lookup: it is gone from 2.13's headers) frees a long chain
    // of nodes without deep recursion.
    return std::shared_ptr<NodeType>(new NodeType(std::forward<Args>(args)...),
                                     [](NodeType* node) { deleteNode(node); });
  } else {
    return c10::make_intrusive<NodeType>(std::forward<Args>(args)...);
  }
}

// The graph node of a call made under a torch.func transform: what OpGradient saves, kept in
// SavedVariables as ATen's generated nodes keep theirs (they check in-place changes on unpacking).
struct TransformedOpGradient : public torch::autograd::Node {
  explicit TransformedOpGradient(const GradientPlan& plan) : plan(plan) {}

  variable_list apply(variable_list&& output_gradients) override {
    variable_list tensors;
    tensors.reserve(saved.size());
    for (auto& s : saved) tensors.push_back(s.unpack(getptr()));
    for (size_t i = 0; i < output_gradients.size(); ++i) {
      if (!output_gradients[i].defined()) output_gradients[i] = input_metadata(i).zeros_like();
    }
    return call_backward(plan, tensors, saved_data, output_gradients);
  }

  void release_variables() override {
    for (auto& s : saved) s.reset_data();
  }

  std::string name() const override { return plan.forward_name + "_backward"; }

  const GradientPlan& plan;
  std::vector<torch::autograd::SavedVariable> saved;  // the plan's saved arguments, then outputs
  SavedValues saved_data;
};

// torch.func keeps its dynamic-layer keys in the thread's included set while a transform is active
// (ATen/functorch/DynamicLayer.h says so directly, but its headers need nlohmann/json, which torch does
// not ship).
bool under_functorch_transform() {
  return c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerBackMode);
}

// Forward-mode gradients: none. An argument with a tangent gets an error, not a silent zero tangent.
void refuse_tangents(const c10::OperatorHandle& op, const torch::jit::Stack& stack) {
  const auto& arguments = op.schema().arguments();
  const auto first = stack.end() - static_cast<std::ptrdiff_t>(arguments.size());
  for (size_t i = 0; i < arguments.size(); ++i) {
    const c10::IValue& value = first[static_cast<std::ptrdiff_t>(i)];
    TORCH_CHECK_NOT_IMPLEMENTED(
        !(value.isTensor() && value.toTensor().defined() && value.toTensor()._fw_grad(/*level=*/0).defined()),
        op.schema().name(), ": argument '", arguments[i].name(),
        "' carries a forward-mode tangent (torch.func.jvp, jacfwd, torch.autograd.forward_ad), and rnnattn_ext's "
        "ops have reverse-mode gradients only: call the layer through rnnattn_ext's modules or "
        "rnnattn_ext.functional, which run it as plain torch operations in forward mode");
  }
}

// Under a torch.func transform: the call below autograd, then a TransformedOpGradient as the grad_fn of
// the differentiable outputs (in their order, as OpGradient's outputs).
void forward_under_transform(const GradientPlan& plan, const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                             torch::jit::Stack* stack, const std::vector<at::Tensor>& gradient_inputs,
                             std::vector<int64_t> gradient_arguments) {
  const auto arguments = stack->end() - static_cast<std::ptrdiff_t>(plan.num_arguments);
  auto node = make_node<TransformedOpGradient>(plan);
  node->set_next_edges(torch::autograd::collect_next_edges(gradient_inputs));
  for (size_t k : plan.saved_arguments) {
    node->saved.emplace_back(arguments[k].isTensor() ? arguments[k].toTensor() : at::Tensor(), /*is_output=*/false);
  }
  save_values(plan, arguments, std::move(gradient_arguments), node->saved_data);
  {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  const auto returns = stack->end() - static_cast<std::ptrdiff_t>(plan.num_returns);
  for (size_t k : plan.differentiable_outputs) torch::autograd::set_history(returns[k].toTensor(), node);
  for (size_t k : plan.saved_outputs) {
    const bool has_history = position_in(plan.differentiable_outputs, k).has_value();
    node->saved.emplace_back(returns[k].toTensor(), /*is_output=*/has_history);
  }
}

void differentiable_forward(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  refuse_tangents(op, *stack);
  const GradientPlan& plan = plan_for(op.schema().name());
  const auto arguments = stack->end() - static_cast<std::ptrdiff_t>(plan.num_arguments);
  std::vector<at::Tensor> gradient_inputs;
  std::vector<int64_t> gradient_arguments;
  bool requires_grad = false;
  if (at::GradMode::is_enabled()) {
    for (size_t k : plan.differentiable_arguments) {
      if (!arguments[k].isTensor()) continue;  // an absent optional argument
      gradient_inputs.push_back(arguments[k].toTensor());
      gradient_arguments.push_back(static_cast<int64_t>(k));
      requires_grad = requires_grad || gradient_inputs.back().requires_grad();
    }
  }
  if (!requires_grad) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
    return;
  }
  if (under_functorch_transform()) {
    forward_under_transform(plan, op, keys, stack, gradient_inputs, std::move(gradient_arguments));
    return;
  }
  PendingCall call{plan, op, keys, *stack, std::move(gradient_arguments)};
  variable_list outputs = OpGradient::apply(at::TensorList(gradient_inputs), &call);
  const auto returns = stack->end() - static_cast<std::ptrdiff_t>(plan.num_returns);
  for (size_t i = 0; i < outputs.size(); ++i) returns[plan.differentiable_outputs[i]] = std::move(outputs[i]);
}

void not_differentiable(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  refuse_tangents(op, *stack);
  const size_t num_arguments = op.schema().arguments().size();
  std::vector<at::Tensor> needing_grad;
  if (at::GradMode::is_enabled()) {
    for (auto value = stack->end() - static_cast<std::ptrdiff_t>(num_arguments); value != stack->end(); ++value) {
      if (value->isTensor() && value->toTensor().requires_grad()) needing_grad.push_back(value->toTensor());
    }
  }
  {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  if (needing_grad.empty()) return;
  const auto node = make_node<torch::autograd::Error>(
      op.schema().name() +
          " is not differentiable: rnnattn_ext's ops have first-order gradients only (a second-order "
          "gradient, as from torch.autograd.grad(..., create_graph=True) followed by another backward, is not "
          "implemented)",
      torch::autograd::collect_next_edges(needing_grad));
  const size_t num_returns = op.schema().returns().size();
  for (auto value = stack->end() - static_cast<std::ptrdiff_t>(num_returns); value != stack->end(); ++value) {
    at::Tensor gradient = value->toTensor();
    if (gradient.defined()) torch::autograd::set_history(gradient, node);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(rnnattn, Autograd, m) {
  for (const std::string& name : forward_op_names()) {
    m.impl(name.c_str(), torch::CppFunction::makeFromBoxedFunction<&differentiable_forward>());
    m.impl(backward_op_name(name).c_str(), torch::CppFunction::makeFromBoxedFunction<&not_differentiable>());
  }
}

}  // namespace rnnattn
