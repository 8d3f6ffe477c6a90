// The modules' common call in C++: a batched tensor or a PackedSequence on the CPU, an hx of the
// expected shapes and optional CPU lengths (RecurrentBase._run_layers in
// python/rnnattn_ext/modules.py: every layer and direction, with torch.nn's dropout between layers;
// AttentionRecurrentBase._run_attention_layers in attention_modules.py likewise for one direction
// without lengths or dropout, for a streaming call also with each layer's self-memory slots to
// carry). It calls the cell's forward op
// through the dispatcher, as torch.ops does, so autograd, autocast, every device, __torch_dispatch__
// modes and the op's own checks and errors apply unchanged. What it saves is Python: at a streaming
// step (T = 1) the states' select and unsqueeze, the functional layer's checks, torch.ops' argument
// parsing and gathering each layer's parameters cost about as much as the op itself; a bidirectional
// call or one with lengths took ~150-250 µs more through the functional stack. The
// parameters are read here, at every call, from the module by the names it works out once
// (RecurrentBase._layer_call).
//
// Anything else returns None, and the module takes its general Python path, which explains bad
// arguments in its own errors: a __torch_function__ mode or a Tensor subclass (torch.ops would
// hand it the call), torch.jit.trace (which would record this file's sizes as constants), a CPU
// float16/bfloat16 input (the functional layer computes it in float32), another hx layout, lengths
// that are not a CPU int64 (B,) tensor of values in [1, T] (the module converts or explains them).
#include "python_layer_call.h"

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <ATen/core/stack.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/dropout.h>
#include <ATen/ops/index_copy.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>
#include <pybind11/stl.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/frontend/tracer.h>

#include "carried_slots.h"
#include "engine/recurrent_engine.h"
#include "ops/argument_checks.h"
#include "python_tensors.h"

#include <functional>
#include <optional>
#include <string>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

using rnnattn::plain_call;
using rnnattn::plain_tensor;
using rnnattn::wrap;

// Where a forward op's argument comes from, read once per op from its schema's argument names.
enum class Source {
  input, state, weight, optional_weight, lengths, reverse, training,
  // The attention ops' (absent from the base ops' schemas).
  memory, memory_lengths, past_keys, past_values, num_heads, window, need_weights
};

struct ForwardOp {
  c10::OperatorHandle handle;
  std::vector<Source> arguments;  // in schema order
  size_t states = 0;
  std::vector<bool> required_weight;  // per weight argument (weight_*, bias_*), in schema order
};

Source source_of(const c10::Argument& argument) {
  static const std::unordered_map<std::string, Source> named{
      {"input", Source::input},         {"h0", Source::state},
      {"c0", Source::state},            {"lengths", Source::lengths},
      {"reverse", Source::reverse},     {"training", Source::training},
      {"memory", Source::memory},       {"memory_lengths", Source::memory_lengths},
      {"past_keys", Source::past_keys}, {"past_values", Source::past_values},
      {"num_heads", Source::num_heads}, {"window", Source::window},
      {"need_weights", Source::need_weights}};
  const std::string& name = argument.name();
  if (name.rfind("weight_", 0) == 0 || name.rfind("bias_", 0) == 0) {
    return argument.type()->kind() == c10::TypeKind::OptionalType ? Source::optional_weight : Source::weight;
  }
  const auto found = named.find(name);
  TORCH_INTERNAL_ASSERT(found != named.end(), "rnnattn: unexpected argument ", name, " of a forward op");
  return found->second;
}

// The op rnnattn::<name> (a cell's "<cell>_forward" or "<cell>_attn_forward"). The caller holds the
// GIL, which guards the table.
const ForwardOp& forward_op(const std::string& name) {
  static std::unordered_map<std::string, ForwardOp> ops;
  auto found = ops.find(name);
  if (found != ops.end()) return found->second;
  const std::string qualified = "rnnattn::" + name;
  ForwardOp op{c10::Dispatcher::singleton().findSchemaOrThrow(qualified.c_str(), ""), {}, 0, {}};
  for (const auto& argument : op.handle.schema().arguments()) {
    const Source source = source_of(argument);
    op.arguments.push_back(source);
    if (source == Source::state) ++op.states;
    if (source == Source::weight || source == Source::optional_weight) {
      op.required_weight.push_back(source == Source::weight);
    }
  }
  return ops.emplace(name, std::move(op)).first->second;
}

// float16/bfloat16 on the CPU outside autocast, which the attention ops do not take (their Python
// path casts it up; the base ops compute it in float32 themselves).
bool reduced_on_cpu(const at::Tensor& input) {
  const auto dtype = input.scalar_type();
  return input.is_cpu() && (dtype == at::kHalf || dtype == at::kBFloat16) &&
         !at::autocast::is_autocast_enabled(at::kCPU);
}

// A tensor argument that may be None: false when it is something else than None or a plain tensor.
bool optional_plain(py::handle object, std::optional<at::Tensor>& out) {
  if (object.is_none()) return true;
  const at::Tensor* tensor = plain_tensor(object);
  if (tensor == nullptr) return false;
  out = *tensor;
  return true;
}

// The attention op's own arguments for one layer (AttentionRecurrentBase._run_attention_layers).
struct AttentionArguments {
  int64_t num_heads = 1;
  std::optional<int64_t> window;
  std::optional<at::Tensor> memory, memory_lengths, past_keys, past_values;
};

// A module call's arguments, taken from its Python objects: the input, hx, lengths and the weights of
// every layer and direction (index layer * directions + direction, as torch.nn counts them).
struct LayersCall {
  at::Tensor x;  // time-major
  std::vector<at::Tensor> states;  // hx's (layers * directions, B, width) tensors; empty: zeros
  std::vector<at::Tensor> zeros;   // hx None: one (B, width) zero tensor per state, for every layer
  std::vector<std::vector<at::Tensor>> weights;  // per layer and direction, in the op's schema order; undefined: None
  int64_t directions = 1;
  std::optional<at::Tensor> lengths;  // (B,) int64 on the CPU
  double dropout = 0.0;  // torch.nn's dropout between layers, in training (0: none)
  int64_t layers() const { return static_cast<int64_t>(weights.size()) / directions; }
  at::Tensor state(size_t s, int64_t index) const { return states.empty() ? zeros[s] : states[s].select(0, index); }
};

// The module's parameter `name` as its attribute gives it: from its _parameters dict (`parameters`),
// else by getattr (a parametrized weight); false when it is neither a plain tensor nor None.
bool module_parameter(py::handle module, py::handle parameters, py::handle name, at::Tensor& out) {
  py::handle found = PyDict_GetItemWithError(parameters.ptr(), name.ptr());  // borrowed
  if (found.ptr() == nullptr && PyErr_Occurred()) throw py::error_already_set();
  py::object attribute;
  if (found.ptr() == nullptr) {
    attribute = py::getattr(module, name, py::none());
    found = attribute;
  }
  if (found.is_none()) {
    out = at::Tensor();
    return true;
  }
  const at::Tensor* tensor = plain_tensor(found);
  if (tensor == nullptr) return false;
  out = *tensor;  // a reference of our own: the module may drop its parameter while the op runs
  return true;
}

// Whether the call's lengths are what the C++ call takes: None, or a CPU int64 (B,) tensor of values
// in [1, T] for an input on the CPU (the module's general path converts or explains anything else).
bool takes_lengths(const std::optional<at::Tensor>& lengths, const at::Tensor& x) {
  if (!lengths) return true;
  if (!x.is_cpu() || !lengths->is_cpu() || lengths->scalar_type() != at::kLong || lengths->dim() != 1 ||
      lengths->size(0) != x.size(1)) {
    return false;
  }
  if (lengths->numel() == 0) return true;
  const auto [low, high] = rnnattn::value_range(*lengths);
  return low >= 1 && high <= x.size(0);
}

// A PackedSequence on the CPU as the layers take it: its data padded time-major (T, B, I) in the
// packed order (longest first, so the recurrent products shrink to the rows still running), its
// lengths, where each packed row lies in the padded batch, and its batch orders. Padding and packing
// by these rows (index_copy, index_select) cost a fraction of aten's _pad_packed_sequence and
// _pack_padded_sequence, which copy step by step; both give the same numbers and gradients.
struct PackedCall {
  at::Tensor padded, lengths, rows;  // rows: packed row i is padded row rows[i] = t * B + b
  std::optional<at::Tensor> sorted_indices, unsorted_indices;
};

// The packed call of a (data, batch_sizes, sorted_indices, unsorted_indices) tuple (a PackedSequence),
// or nothing when the general path must take it.
std::optional<PackedCall> packed_call(py::handle packed) {
  if (py::len(packed) != 4) return std::nullopt;
  const auto parts = py::reinterpret_borrow<py::tuple>(packed);
  const at::Tensor* data = plain_tensor(parts[0]);
  const at::Tensor* batch_sizes = plain_tensor(parts[1]);
  if (data == nullptr || batch_sizes == nullptr || data->dim() != 2 || !data->is_cpu() || !batch_sizes->is_cpu() ||
      batch_sizes->scalar_type() != at::kLong || batch_sizes->dim() != 1 || batch_sizes->numel() == 0) {
    return std::nullopt;
  }
  PackedCall call;
  if (!optional_plain(parts[2], call.sorted_indices) || !optional_plain(parts[3], call.unsorted_indices)) {
    return std::nullopt;
  }
  // batch_sizes: positive, non-increasing, adding up to the packed rows (as a PackedSequence's are).
  const at::Tensor sizes = batch_sizes->contiguous();
  const int64_t* size = sizes.const_data_ptr<int64_t>();
  const int64_t T = sizes.numel(), B = size[0];
  int64_t total = 0;
  for (int64_t t = 0; t < T; ++t) {
    if (size[t] < 1 || size[t] > (t == 0 ? B : size[t - 1])) return std::nullopt;
    total += size[t];
  }
  if (total != data->size(0)) return std::nullopt;
  for (const auto* order : {&call.sorted_indices, &call.unsorted_indices}) {
    if (*order && ((*order)->scalar_type() != at::kLong || (*order)->dim() != 1 || (*order)->size(0) != B ||
                   !(*order)->is_cpu())) {
      return std::nullopt;
    }
  }
  call.rows = at::empty({total}, sizes.options());
  call.lengths = at::zeros({B}, sizes.options());
  int64_t* row = call.rows.data_ptr<int64_t>();
  int64_t* length = call.lengths.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t b = 0; b < size[t]; ++b) {
      *row++ = t * B + b;
      length[b] = t + 1;
    }
  }
  const int64_t width = data->size(1);
  call.padded = at::zeros({T * B, width}, data->options()).index_copy(0, call.rows, *data).view({T, B, width});
  return call;
}

// The call's input and lengths: a plain tensor and its lengths (None or a plain tensor), or a
// PackedSequence (lengths None, time-major) padded by packed_call; false when the general path must
// take it. `tensor` then points into `packed` or at the input.
bool call_input(py::handle input, py::handle lengths, bool batch_first, std::optional<PackedCall>& packed,
                const at::Tensor*& tensor, std::optional<at::Tensor>& given_lengths) {
  if (!py::isinstance<py::tuple>(input)) {
    tensor = plain_tensor(input);
    return optional_plain(lengths, given_lengths);
  }
  if (!lengths.is_none() || batch_first) return false;
  packed = packed_call(input);
  if (!packed) return false;
  tensor = &packed->padded;
  given_lengths = packed->lengths;
  return true;
}

// A per-row tensor of the caller's (hx, memory, memory_lengths) in a packed call's batch order.
at::Tensor in_packed_order(const std::optional<PackedCall>& packed, const at::Tensor& t, int64_t dim) {
  return packed && packed->sorted_indices ? t.index_select(dim, *packed->sorted_indices) : t;
}

// The output in the caller's layout (a packed call's: its packed data; batch-first if asked), and
// the final states (…, B, width) in the caller's batch order.
at::Tensor in_callers_layout(const std::optional<PackedCall>& packed, bool batch_first, at::Tensor output,
                             std::vector<at::Tensor>& finals) {
  if (!packed) return batch_first ? output.transpose(0, 1) : output;
  if (packed->unsorted_indices) {
    for (auto& state : finals) state = state.index_select(1, *packed->unsorted_indices);
  }
  return output.reshape({output.size(0) * output.size(1), output.size(2)}).index_select(0, packed->rows);
}

// The call's input, states, lengths and weights, or nothing when the general path must take it. The
// weights are the module's parameters named, per layer and direction, by `layer_names` in the op's
// schema order (None for one the module does not have: no bias, no projection).
std::optional<LayersCall> layers_call(const ForwardOp& op, const at::Tensor* input, py::handle hx, int64_t input_size,
                                      const std::vector<int64_t>& widths, bool batch_first, py::handle module,
                                      const py::sequence& layer_names, int64_t directions = 1,
                                      std::optional<at::Tensor> lengths = std::nullopt) {
  if (input == nullptr || input->dim() != 3 || input->size(2) != input_size) {
    return std::nullopt;
  }
  TORCH_INTERNAL_ASSERT(op.states == widths.size(), "rnnattn: ", op.handle.schema().name(), " takes ", op.states,
                        " states");
  LayersCall call;
  call.x = batch_first ? input->transpose(0, 1) : *input;
  call.directions = directions;
  const int64_t batch = call.x.size(1), entries = static_cast<int64_t>(py::len(layer_names));
  if (call.x.size(0) == 0 || entries == 0 || entries % directions != 0) return std::nullopt;
  if (!takes_lengths(lengths, call.x)) return std::nullopt;
  call.lengths = std::move(lengths);

  const py::object parameters = module.attr("_parameters");
  for (py::handle names : layer_names) {
    std::vector<at::Tensor> tensors;
    for (py::handle name : py::reinterpret_borrow<py::sequence>(names)) {
      tensors.emplace_back();
      if (!name.is_none() && !module_parameter(module, parameters, name, tensors.back())) return std::nullopt;
    }
    // A required weight missing: the general path explains it.
    if (tensors.size() > op.required_weight.size()) return std::nullopt;
    for (size_t i = 0; i < op.required_weight.size(); ++i) {
      if (op.required_weight[i] && (i >= tensors.size() || !tensors[i].defined())) return std::nullopt;
    }
    // CPU float16/bfloat16 input to a module of another dtype: the general path names the mismatch in
    // the module's terms.
    if (reduced_on_cpu(*input) && tensors[0].scalar_type() != input->scalar_type()) return std::nullopt;
    call.weights.push_back(std::move(tensors));
  }

  if (hx.is_none()) {
    for (const int64_t width : widths) call.zeros.push_back(at::zeros({batch, width}, call.x.options()));
  } else {
    // LSTM: a (h_0, c_0) tuple or list; the one-state cells: h_0 itself.
    std::vector<py::handle> given;
    if (widths.size() == 1) {
      given.push_back(hx);
    } else if (py::isinstance<py::tuple>(hx) || py::isinstance<py::list>(hx)) {
      for (py::handle state : py::reinterpret_borrow<py::sequence>(hx)) given.push_back(state);
    }
    if (given.size() != widths.size()) return std::nullopt;
    for (size_t i = 0; i < given.size(); ++i) {
      const at::Tensor* state = plain_tensor(given[i]);
      if (state == nullptr || state->dim() != 3 || state->size(0) != entries || state->size(1) != batch ||
          state->size(2) != widths[i]) {
        return std::nullopt;
      }
      call.states.push_back(*state);
    }
  }
  return call;
}

// Activations are kept for backward only when autograd will differentiate (functional.needs_workspace).
bool needs_workspace(const at::Tensor& x, const std::vector<at::Tensor>& states,
                     const std::vector<at::Tensor>& weights, const AttentionArguments* attention) {
  if (!at::GradMode::is_enabled()) return false;
  bool any = x.requires_grad();
  for (const auto& s : states) any = any || s.requires_grad();
  for (const auto& w : weights) any = any || (w.defined() && w.requires_grad());
  if (attention != nullptr) {
    for (const auto* t : {&attention->memory, &attention->past_keys, &attention->past_values}) {
      any = any || (t->has_value() && (*t)->requires_grad());
    }
  }
  return any;
}

// Runs the op on one layer's arguments in one direction (layers_call has checked its weights); its
// outputs are left on the stack.
void call_op(const ForwardOp& op, const at::Tensor& x, const std::vector<at::Tensor>& states,
             const std::vector<at::Tensor>& weights, const std::optional<at::Tensor>& lengths, bool reverse,
             const AttentionArguments* attention, torch::jit::Stack& stack) {
  const bool training = needs_workspace(x, states, weights, attention);
  auto optional = [&stack](const std::optional<at::Tensor>& t) {
    if (t) stack.emplace_back(*t); else stack.emplace_back();
  };
  stack.clear();
  stack.reserve(op.arguments.size());
  size_t next_state = 0, next_weight = 0;
  for (const Source source : op.arguments) {
    TORCH_INTERNAL_ASSERT(attention != nullptr || source <= Source::training, "rnnattn: ",
                          op.handle.schema().name(), " needs the attention arguments");
    switch (source) {
      case Source::input: stack.emplace_back(x); break;
      case Source::state: stack.emplace_back(states[next_state++]); break;
      case Source::weight:
      case Source::optional_weight: {
        const at::Tensor* w = next_weight < weights.size() ? &weights[next_weight] : nullptr;
        ++next_weight;
        if (w == nullptr || !w->defined()) stack.emplace_back(); else stack.emplace_back(*w);
        break;
      }
      case Source::lengths: optional(lengths); break;
      case Source::reverse: stack.emplace_back(reverse); break;
      case Source::training: stack.emplace_back(training); break;
      case Source::memory: optional(attention->memory); break;
      case Source::memory_lengths: optional(attention->memory_lengths); break;
      case Source::past_keys: optional(attention->past_keys); break;
      case Source::past_values: optional(attention->past_values); break;
      case Source::num_heads: stack.emplace_back(attention->num_heads); break;
      case Source::window:
        if (attention->window) stack.emplace_back(*attention->window); else stack.emplace_back();
        break;
      case Source::need_weights: stack.emplace_back(false); break;
    }
  }
  // As torch.ops: other Python threads run while the op does.
  py::gil_scoped_release no_gil;
  op.handle.callBoxed(stack);
}

// Runs every layer (each one's output, its directions' side by side and after the dropout between
// layers, the next one's input; attention: each layer's own arguments, and after_layer sees each
// layer's initial h (of its first direction) and time-major output before that dropout);
// returns the last layer's output (time-major) and per state the final states of every layer and
// direction, (layers * directions, B, width), as functional.stack.
std::pair<at::Tensor, std::vector<at::Tensor>> run_each_layer(
    const ForwardOp& op, const LayersCall& call, const std::vector<AttentionArguments>* attention = nullptr,
    const std::function<void(int64_t, const at::Tensor&, const at::Tensor&)>& after_layer = {}) {
  // Under no_grad or inference_mode (a streaming step's usual case) the views made here skip
  // autograd's view tracking, ~2 µs a view, a tenth of a small layer's step: each layer's states are
  // views of hx that only the op sees, and a one-layer final state a view of an op output that nothing
  // else holds. With grad mode on they are made as usual (hx may require grad; torch.func's
  // transforms wrap the tensors).
  const bool untracked_views = !at::GradMode::is_enabled();
  torch::jit::Stack stack;
  at::Tensor x = call.x;
  std::vector<std::vector<at::Tensor>> finals(op.states);
  std::vector<at::Tensor> outputs(call.directions);
  for (int64_t layer = 0; layer < call.layers(); ++layer) {
    at::Tensor first_h;  // the layer's h_0 (first direction), for after_layer
    for (int64_t direction = 0; direction < call.directions; ++direction) {
      const int64_t index = layer * call.directions + direction;
      std::vector<at::Tensor> states;
      {
        std::optional<at::AutoDispatchBelowADInplaceOrView> untracked;
        if (untracked_views) untracked.emplace();
        for (size_t s = 0; s < op.states; ++s) states.push_back(call.state(s, index));
      }
      if (direction == 0) first_h = states[0];
      call_op(op, x, states, call.weights[index], call.lengths, /*reverse=*/direction == 1,
              attention ? &(*attention)[layer] : nullptr, stack);
      outputs[direction] = stack[0].toTensor();
      for (size_t s = 0; s < op.states; ++s) finals[s].push_back(stack[1 + s].toTensor());
    }
    x = call.directions == 1 ? outputs[0] : at::cat(outputs, 2);
    if (after_layer) after_layer(layer, first_h, x);
    // As functional.stack's F.dropout (the same ATen call: the same random numbers).
    if (call.dropout > 0.0 && layer + 1 < call.layers()) x = at::dropout(x, call.dropout, /*train=*/true);
  }
  std::vector<at::Tensor> stacked;  // as functional.stacked_states
  for (auto& f : finals) {
    if (f.size() > 1) {
      stacked.push_back(at::stack(f, 0));
    } else {
      std::optional<at::AutoDispatchBelowADInplaceOrView> untracked;
      if (untracked_views) untracked.emplace();
      stacked.push_back(f[0].unsqueeze(0));
    }
  }
  return {x, stacked};
}

py::list wrap_all(std::vector<at::Tensor> tensors) {
  py::list list;
  for (auto& t : tensors) list.append(wrap(std::move(t)));
  return list;
}

// (output, [final states]) with the module's layouts (output batch-first if asked, each final
// state (layers * directions, B, width)), or None when the general path must take the call. The
// weights are `module`'s parameters named by `layer_names`, per layer and direction (layers_call).
// `input` may be a PackedSequence on the CPU (lengths None): its output is then the packed data,
// and hx's rows are taken in its packed order and the final states' given back in the caller's.
// `dropout`: the probability of torch.nn's dropout between layers (0 outside training).
py::object run_layers(const std::string& cell, py::handle input, py::handle hx, int64_t input_size,
                      const std::vector<int64_t>& widths, bool batch_first, py::handle module,
                      const py::sequence& layer_names, int64_t directions, py::handle lengths, double dropout) {
  HANDLE_TH_ERRORS
  if (!plain_call()) return py::none();
  const ForwardOp& op = forward_op(cell + "_forward");
  std::optional<PackedCall> packed;
  const at::Tensor* x = nullptr;
  std::optional<at::Tensor> given_lengths;
  if (!call_input(input, lengths, batch_first, packed, x, given_lengths)) return py::none();
  std::optional<LayersCall> call =
      layers_call(op, x, hx, input_size, widths, batch_first, module, layer_names, directions, given_lengths);
  if (!call) return py::none();
  call->dropout = dropout;
  for (auto& state : call->states) state = in_packed_order(packed, state, 1);
  auto [output, finals] = run_each_layer(op, *call, nullptr);
  output = in_callers_layout(packed, batch_first, std::move(output), finals);
  return py::make_tuple(wrap(std::move(output)), wrap_all(std::move(finals)));
  END_HANDLE_TH_ERRORS_PYBIND
}

// Streaming self memory: the keys and values the next call takes as past_keys/past_values (None with
// window 1). w_k, b_k, w_v, b_v are weights[key_index .. key_index + 3].
std::pair<py::object, py::object> carried_slots(const at::Tensor& h0, const at::Tensor& output,
                                                const std::vector<at::Tensor>& weights, size_t key_index,
                                                const AttentionArguments& attention) {
  const std::optional<int64_t> wanted = attention.window ? std::optional<int64_t>(*attention.window - 1) : std::nullopt;
  if (wanted == 0) return {py::none(), py::none()};
  // layers_call has checked that the required weights are there.
  auto bias = [&](size_t i) { return weights[i].defined() ? std::optional<at::Tensor>(weights[i]) : std::nullopt; };
  auto [keys, values] = rnnattn::carried_slots(h0, output, weights[key_index], bias(key_index + 1),
                                               weights[key_index + 2], bias(key_index + 3), attention.past_keys,
                                               attention.past_values, wanted);
  return {wrap(std::move(keys)), wrap(std::move(values))};
}

// The attention modules' call (as run_layers; a PackedSequence's memory and memory_lengths are taken
// in its packed order too): (output, [final states],
// keys, values), keys and values per layer the self memory's slots to carry (carried_slots) when
// carry_slots is set (one direction), else None; or None when the general path must take the call.
// Every layer and direction attends over the same external memory.
// The weights are `module`'s parameters named by `layer_names` (layers_call; the LSTM's include
// weight_hr, None without a projection); `past_keys`, `past_values`: None or per layer a tensor or None.
py::object run_attention_layers(const std::string& cell, py::handle input, py::handle hx, int64_t input_size,
                                const std::vector<int64_t>& widths, bool batch_first, py::handle module,
                                const py::sequence& layer_names, int64_t directions, py::handle lengths,
                                double dropout, int64_t num_heads, std::optional<int64_t> window,
                                py::handle memory, py::handle memory_lengths, py::handle past_keys,
                                py::handle past_values, bool carry_slots) {
  HANDLE_TH_ERRORS
  if (!plain_call() || (carry_slots && directions != 1)) return py::none();
  const ForwardOp& op = forward_op(cell + "_attn_forward");
  std::optional<PackedCall> packed;
  const at::Tensor* x = nullptr;
  std::optional<at::Tensor> given_lengths;
  if (!call_input(input, lengths, batch_first, packed, x, given_lengths) || (packed && carry_slots) ||
      (x != nullptr && reduced_on_cpu(*x))) {  // the attention ops take float32 there: Python casts up
    return py::none();
  }
  std::optional<LayersCall> call =
      layers_call(op, x, hx, input_size, widths, batch_first, module, layer_names, directions, given_lengths);
  if (!call) return py::none();
  call->dropout = dropout;
  AttentionArguments shared{num_heads, window, {}, {}, {}, {}};  // every layer attends over the same memory
  if (!optional_plain(memory, shared.memory) || !optional_plain(memory_lengths, shared.memory_lengths)) {
    return py::none();
  }
  if (packed && shared.memory &&
      (shared.memory->dim() != 3 || shared.memory->size(1) != call->x.size(1) ||
       (shared.memory_lengths && (shared.memory_lengths->dim() != 1 || shared.memory_lengths->size(0) != call->x.size(1))))) {
    return py::none();  // (the op would explain it, but its rows must not be reordered first)
  }
  for (auto& state : call->states) state = in_packed_order(packed, state, 1);
  if (shared.memory) shared.memory = in_packed_order(packed, *shared.memory, 1);
  if (shared.memory_lengths) shared.memory_lengths = in_packed_order(packed, *shared.memory_lengths, 0);
  std::vector<AttentionArguments> attention(call->layers(), shared);
  // Each layer's past slots: a list as long as the stack (the general path indexes it per layer).
  for (auto [given, slot] : {std::pair{past_keys, &AttentionArguments::past_keys},
                             std::pair{past_values, &AttentionArguments::past_values}}) {
    if (given.is_none()) continue;
    if (!py::isinstance<py::list>(given) && !py::isinstance<py::tuple>(given)) return py::none();
    const auto per_layer = py::reinterpret_borrow<py::sequence>(given);
    if (static_cast<int64_t>(py::len(per_layer)) != call->layers()) return py::none();
    for (int64_t layer = 0; layer < call->layers(); ++layer) {
      if (!optional_plain(per_layer[layer], attention[layer].*slot)) return py::none();
    }
  }
  const bool carry = carry_slots && !attention[0].memory;  // an external memory carries nothing
  py::list keys, values;
  auto [output, finals] = run_each_layer(op, *call, &attention, [&](int64_t layer, const at::Tensor& h0,
                                                                    const at::Tensor& y) {
    if (!carry) return;
    // w_k, b_k, w_v, b_v are the fifth- to second-last weights (w_c is the last).
    const std::vector<at::Tensor>& weights = call->weights[layer];
    TORCH_INTERNAL_ASSERT(weights.size() >= 11, "rnnattn: an attention layer has at least 11 weights");
    auto [k, v] = carried_slots(h0, y, weights, weights.size() - 5, attention[layer]);
    keys.append(k);
    values.append(v);
  });
  output = in_callers_layout(packed, batch_first, std::move(output), finals);
  return py::make_tuple(wrap(std::move(output)), wrap_all(std::move(finals)),
                        carry ? py::object(keys) : py::none(), carry ? py::object(values) : py::none());
  END_HANDLE_TH_ERRORS_PYBIND
}

}  // namespace

namespace rnnattn {

void define_layer_call(py::module_& module) {
  module.def("run_layers", &run_layers, py::arg("cell"), py::arg("input"), py::arg("hx"), py::arg("input_size"),
             py::arg("widths"), py::arg("batch_first"), py::arg("module"), py::arg("layer_names"),
             py::arg("directions"), py::arg("lengths"), py::arg("dropout"),
             "A module call through the cell's forward op, layer by layer and direction by direction: (output, "
             "[finals]), or None when the module's general path must take it (see csrc/python_layer_call.cpp)");
  module.def("run_attention_layers", &run_attention_layers, py::arg("cell"), py::arg("input"), py::arg("hx"),
             py::arg("input_size"), py::arg("widths"), py::arg("batch_first"), py::arg("module"),
             py::arg("layer_names"), py::arg("directions"), py::arg("lengths"), py::arg("dropout"), py::arg("num_heads"),
             py::arg("window"), py::arg("memory"), py::arg("memory_lengths"),
             py::arg("past_keys"), py::arg("past_values"), py::arg("carry_slots"),
             "The attention modules' call through the cell's attention forward op, layer by layer: (output, "
             "[finals], keys, values), or None when the module's general path must take it");
}

}  // namespace rnnattn
