// The modules' common call in C++: one layer, one direction, a batched tensor and an hx of the
// expected shapes (RecurrentBase._run_one_layer in python/rnnattn_ext/modules.py). It calls the
// cell's forward op through the dispatcher, as torch.ops does, so autograd, autocast, every device,
// __torch_dispatch__ modes and the op's own checks and errors apply unchanged. What it saves is
// Python: at a streaming step (T = 1) the states' select and unsqueeze, the functional layer's
// checks and torch.ops' argument parsing cost about as much as the op itself.
//
// Anything else returns None, and the module takes its general Python path, which explains bad
// arguments in its own errors: a __torch_function__ mode or a Tensor subclass (torch.ops would
// hand it the call), torch.jit.trace (which would record this file's sizes as constants), a CPU
// float16/bfloat16 input (the functional layer computes it in float32), another hx layout.
#include "python_layer_call.h"

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/frontend/tracer.h>

#include <string>
#include <unordered_map>
#include <vector>

namespace py = pybind11;

namespace {

// Where a forward op's argument comes from, read once per op from its schema's argument names.
enum class Source { input, state, weight, optional_weight, absent, reverse, training };

struct ForwardOp {
  c10::OperatorHandle handle;
  std::vector<Source> arguments;  // in schema order
  size_t states = 0;
};

Source source_of(const c10::Argument& argument) {
  const std::string& name = argument.name();
  if (name == "input") return Source::input;
  if (name == "h0" || name == "c0") return Source::state;
  if (name.rfind("weight_", 0) == 0 || name.rfind("bias_", 0) == 0) {
    return argument.type()->kind() == c10::TypeKind::OptionalType ? Source::optional_weight : Source::weight;
  }
  if (name == "lengths") return Source::absent;
  if (name == "reverse") return Source::reverse;
  TORCH_INTERNAL_ASSERT(name == "training", "rnnattn: unexpected argument ", name, " of a forward op");
  return Source::training;
}

// The caller holds the GIL, which guards the table.
const ForwardOp& forward_op(const std::string& cell) {
  static std::unordered_map<std::string, ForwardOp> ops;
  auto found = ops.find(cell);
  if (found != ops.end()) return found->second;
  const std::string name = "rnnattn::" + cell + "_forward";
  ForwardOp op{c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), ""), {}, 0};
  for (const auto& argument : op.handle.schema().arguments()) {
    op.arguments.push_back(source_of(argument));
    if (op.arguments.back() == Source::state) ++op.states;
  }
  return ops.emplace(cell, std::move(op)).first->second;
}

// A plain tensor (or Parameter), whose call torch.ops would not hand to a __torch_function__.
const at::Tensor* plain_tensor(py::handle object) {
  return THPVariable_CheckExact(object.ptr()) ? &THPVariable_Unpack(object.ptr()) : nullptr;
}

bool reduced_on_cpu(const at::Tensor& input) {
  const auto dtype = input.scalar_type();
  return input.is_cpu() && (dtype == at::kHalf || dtype == at::kBFloat16) &&
         !at::autocast::is_autocast_enabled(at::kCPU);
}

py::object wrap(at::Tensor tensor) { return py::reinterpret_steal<py::object>(THPVariable_Wrap(std::move(tensor))); }

// (output, [final states]) with the module's layouts (output batch-first if asked, each final
// state (1, B, width)), or None when the general path must take the call.
py::object run_one_layer(const std::string& cell, py::handle input_object, py::handle hx, int64_t input_size,
                         const std::vector<int64_t>& widths, bool batch_first, const py::tuple& weights) {
  HANDLE_TH_ERRORS
  if (at::impl::torch_function_mode_enabled() || torch::jit::tracer::isTracing()) return py::none();
  const at::Tensor* input = plain_tensor(input_object);
  if (input == nullptr || input->dim() != 3 || input->size(2) != input_size || reduced_on_cpu(*input)) {
    return py::none();
  }
  const ForwardOp& op = forward_op(cell);
  TORCH_INTERNAL_ASSERT(op.states == widths.size(), "rnnattn: ", cell, " takes ", op.states, " states");
  const at::Tensor x = batch_first ? input->transpose(0, 1) : *input;
  const int64_t batch = x.size(1);
  if (x.size(0) == 0) return py::none();

  std::vector<at::Tensor> states;
  if (hx.is_none()) {
    for (const int64_t width : widths) states.push_back(at::zeros({batch, width}, x.options()));
  } else {
    // LSTM: a (h_0, c_0) tuple or list; the one-state cells: h_0 itself.
    std::vector<py::handle> given;
    if (widths.size() == 1) {
      given.push_back(hx);
    } else if (py::isinstance<py::tuple>(hx) || py::isinstance<py::list>(hx)) {
      for (py::handle state : py::reinterpret_borrow<py::sequence>(hx)) given.push_back(state);
    }
    if (given.size() != widths.size()) return py::none();
    for (size_t i = 0; i < given.size(); ++i) {
      const at::Tensor* state = plain_tensor(given[i]);
      if (state == nullptr || state->dim() != 3 || state->size(0) != 1 || state->size(1) != batch ||
          state->size(2) != widths[i]) {
        return py::none();
      }
      states.push_back(state->select(0, 0));
    }
  }

  std::vector<const at::Tensor*> weight_tensors;  // nullptr: absent (None)
  for (py::handle weight : weights) {
    const at::Tensor* tensor = weight.is_none() ? nullptr : plain_tensor(weight);
    if (tensor == nullptr && !weight.is_none()) return py::none();
    weight_tensors.push_back(tensor);
  }

  // Activations are kept for backward only when autograd will differentiate (functional.needs_workspace).
  bool training = false;
  if (at::GradMode::is_enabled()) {
    training = x.requires_grad();
    for (const auto& s : states) training = training || s.requires_grad();
    for (const auto* w : weight_tensors) training = training || (w != nullptr && w->requires_grad());
  }

  torch::jit::Stack stack;
  stack.reserve(op.arguments.size());
  size_t next_state = 0, next_weight = 0;
  for (const Source source : op.arguments) {
    switch (source) {
      case Source::input: stack.emplace_back(x); break;
      case Source::state: stack.emplace_back(states[next_state++]); break;
      case Source::weight:
      case Source::optional_weight: {
        const at::Tensor* w = next_weight < weight_tensors.size() ? weight_tensors[next_weight] : nullptr;
        ++next_weight;
        if (w == nullptr && source == Source::weight) return py::none();  // the general path explains it
        if (w == nullptr) stack.emplace_back(); else stack.emplace_back(*w);
        break;
      }
      case Source::absent: stack.emplace_back(); break;
      case Source::reverse: stack.emplace_back(false); break;
      case Source::training: stack.emplace_back(training); break;
    }
  }
  TORCH_INTERNAL_ASSERT(next_weight >= weight_tensors.size(), "rnnattn: ", cell, "_forward got ",
                        weight_tensors.size(), " weights, its schema has ", next_weight);
  {
    // As torch.ops: other Python threads run while the op does.
    py::gil_scoped_release no_gil;
    op.handle.callBoxed(stack);
  }
  // Outputs: output, the final states, workspace.
  at::Tensor output = std::move(stack[0]).toTensor();
  py::list finals;
  for (size_t i = 1; i <= op.states; ++i) finals.append(wrap(stack[i].toTensor().unsqueeze(0)));
  return py::make_tuple(wrap(batch_first ? output.transpose(0, 1) : std::move(output)), finals);
  END_HANDLE_TH_ERRORS_PYBIND
}

}  // namespace

namespace rnnattn {

void define_layer_call(py::module_& module) {
  module.def("run_one_layer", &run_one_layer, py::arg("cell"), py::arg("input"), py::arg("hx"),
             py::arg("input_size"), py::arg("widths"), py::arg("batch_first"), py::arg("weights"),
             "A one-layer, one-direction module call through the cell's forward op: (output, [finals]), or "
             "None when the module's general path must take it (see csrc/python_layer_call.cpp)");
}

}  // namespace rnnattn
