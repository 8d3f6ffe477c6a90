// rnnattn_ext.Streamer (made by RecurrentBase.streamer, python/rnnattn_ext/modules.py): streaming
// inference one time step per call, the state kept inside. A module's streaming call (Python, the
// module call, the op through the dispatcher with its checks of every weight) costs about 20 µs more
// than the engine's own work on a 2-core x86, most of a small layer's step at batch 1. The streamer
// checks its weights once, when it is made, and each step checks its input and calls the engine.
//
// Its weights are a snapshot: copies made with the streamer, so that nothing later done to the module
// (an optimizer step, load_state_dict, .to(), a replaced parameter) changes them under it or makes them
// disagree with what was checked. Inference only: no autograd graph is recorded. Each layer computes
// as the module's does (CPU float16/bfloat16 in float32, its output and states rounded back), so the
// steps give the module's numbers bit for bit.
#include "python_streamer.h"

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <pybind11/stl.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/frontend/tracer.h>

#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "cells/all_cells.h"
#include "engine/recurrent_engine.h"
#include "ops/argument_checks.h"

namespace py = pybind11;

namespace rnnattn {
namespace {

using at::Tensor;

using ForwardFn = RecurrentForward (*)(const Tensor&, const std::vector<Tensor>&, const Tensor&, const Tensor&,
                                       const std::optional<Tensor>&, const std::optional<Tensor>&,
                                       const std::optional<Tensor>&, const std::optional<Tensor>&, bool, bool,
                                       const AttentionConfig*);

struct CellEntry {
  int gates = 0;
  size_t states = 0;
  ForwardFn forward = nullptr;
};

const CellEntry& cell_entry(const std::string& cell) {
  static const std::map<std::string, CellEntry> cells = [] {
    std::map<std::string, CellEntry> entries;
#define RNNATTN_CELL_ENTRY(CELL) entries[CELL::kName] = {CELL::kGates, CELL::kStates, &recurrent_forward<CELL>};
    RNNATTN_FOR_EACH_CELL(RNNATTN_CELL_ENTRY)
#undef RNNATTN_CELL_ENTRY
    return entries;
  }();
  const auto found = cells.find(cell);
  TORCH_CHECK_VALUE(found != cells.end(), "rnnattn_ext.Streamer: cell must be one of lstm, gru, rnn_tanh, rnn_relu, got ",
                    cell);
  return found->second;
}

constexpr const char* kStep = "rnnattn_ext.Streamer.step";
constexpr const char* kReset = "rnnattn_ext.Streamer.reset";

// A tensor argument: a torch.Tensor (a Parameter too), not a subclass, which could hold no data
// (FakeTensor) or expect its own dispatch; the streamer reads the data directly.
const Tensor& exact_tensor(py::handle object, const char* where, const std::string& name) {
  TORCH_CHECK_TYPE(THPVariable_Check(object.ptr()), where, ": ", name, " must be a torch.Tensor, got ",
                   Py_TYPE(object.ptr())->tp_name);
  TORCH_CHECK_TYPE(THPVariable_CheckExact(object.ptr()), where, ": ", name,
                   " must be a plain torch.Tensor (the streamer calls the engine directly), got the subclass ",
                   Py_TYPE(object.ptr())->tp_name, "; call the module instead");
  return THPVariable_Unpack(object.ptr());
}

py::object wrap(Tensor tensor) { return py::reinterpret_steal<py::object>(THPVariable_Wrap(std::move(tensor))); }

struct LayerWeights {
  Tensor weight_ih, weight_hh;
  std::optional<Tensor> bias_ih, bias_hh, weight_hr;
};

class Streamer {
 public:
  // `layers`: per layer (weight_ih, weight_hh, bias_ih, bias_hh[, weight_hr]), absent ones None, as
  // functional.stack takes them; `widths`: each state's width (h first).
  Streamer(const std::string& cell, const py::sequence& layers, int64_t input_size, std::vector<int64_t> widths)
      : cell_(cell_entry(cell)), input_size_(input_size), widths_(std::move(widths)) {
    TORCH_CHECK_VALUE(widths_.size() == cell_.states, "rnnattn_ext.Streamer: cell ", cell, " has ", cell_.states,
                      " state(s), got ", widths_.size(), " widths");
    TORCH_CHECK_VALUE(py::len(layers) > 0, "rnnattn_ext.Streamer: layers must hold at least one layer");
    const at::NoGradGuard no_grad;
    for (size_t l = 0; l < py::len(layers); ++l) {
      const std::string where = "rnnattn_ext.Streamer, layer " + std::to_string(l);
      const auto parts = py::reinterpret_borrow<py::sequence>(layers[l]);
      TORCH_CHECK_VALUE(py::len(parts) == 4 || py::len(parts) == 5, where,
                        ": expected (weight_ih, weight_hh, bias_ih, bias_hh[, weight_hr]), got ", py::len(parts),
                        " items");
      std::vector<std::optional<Tensor>> copies;
      const char* names[] = {"weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr"};
      for (size_t i = 0; i < py::len(parts); ++i) {
        if (parts[i].is_none()) {
          TORCH_CHECK_TYPE(i >= 2, where, ": ", names[i], " must be a tensor, got None");
          copies.emplace_back();
          continue;
        }
        const Tensor& given = exact_tensor(parts[i], where.c_str(), names[i]);
        if (l == 0 && i == 0) {
          dtype_ = given.scalar_type();
          device_ = given.device();
          // The module computes CPU float16/bfloat16 in float32 (functional.layer).
          const bool reduced = given.is_cpu() && (dtype_ == at::kHalf || dtype_ == at::kBFloat16);
          compute_ = reduced ? at::kFloat : dtype_;
        }
        TORCH_CHECK_TYPE(given.scalar_type() == dtype_, where, ": ", names[i], " must have the dtype of weight_ih_l0 (",
                         dtype_, "), got ", given.scalar_type());
        copies.emplace_back(given.detach().to(given.options().dtype(compute_), /*non_blocking=*/false, /*copy=*/true,
                                              at::MemoryFormat::Contiguous));
      }
      copies.resize(5);
      LayerWeights w{*copies[0], *copies[1], copies[2], copies[3], copies[4]};
      // The op's own checks of every weight, against an input and states of the layer's shapes.
      const auto opts = at::TensorOptions().dtype(compute_).device(device_);
      const Tensor input = at::empty({1, 1, l == 0 ? input_size_ : widths_[0]}, opts);
      std::vector<Tensor> states;
      std::vector<NamedTensor> named;
      const char* state_names[] = {"h0", "c0"};
      for (size_t s = 0; s < widths_.size(); ++s) states.push_back(at::empty({1, widths_[s]}, opts));
      for (size_t s = 0; s < widths_.size(); ++s) named.push_back({state_names[s], states[s]});
      check_layer_forward(where.c_str(), cell_.gates, input, named, w.weight_ih, w.weight_hh, w.bias_ih, w.bias_hh,
                          w.weight_hr);
      layers_.push_back(std::move(w));
    }
  }

  // One time step: input (B, input_size) or (input_size,); returns the last layer's output, (B, width)
  // or (width,).
  py::object step(py::handle input_object) {
    HANDLE_TH_ERRORS
    check_direct_call(kStep);
    const Tensor& input = exact_tensor(input_object, kStep, "input");
    Tensor output;
    {
      const py::gil_scoped_release no_gil;  // as the ops: other Python threads run meanwhile
      const std::lock_guard<std::mutex> lock(mutex_);
      output = advance(input);
    }
    return wrap(std::move(output));
    END_HANDLE_TH_ERRORS_PYBIND
  }

  // The state the next step starts from, in the module's hx layout: per state (num_layers, B, width)
  // (the LSTM's as a tuple (h, c)); None before the first step and after reset().
  py::object state() {
    HANDLE_TH_ERRORS
    std::vector<Tensor> stacked;
    {
      const py::gil_scoped_release no_gil;
      const std::lock_guard<std::mutex> lock(mutex_);
      if (states_.empty()) return py::none();
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      for (size_t s = 0; s < widths_.size(); ++s) {
        std::vector<Tensor> per_layer;
        for (const auto& layer : states_) per_layer.push_back(layer[s]);
        stacked.push_back(at::stack(per_layer, 0));
      }
    }
    if (stacked.size() == 1) return wrap(std::move(stacked[0]));
    py::tuple result(stacked.size());
    for (size_t s = 0; s < stacked.size(); ++s) result[s] = wrap(std::move(stacked[s]));
    return result;
    END_HANDLE_TH_ERRORS_PYBIND
  }

  // Starts a new sequence from `state` (the module's hx layout, copied), or from zeros with None.
  void reset(py::handle state) {
    HANDLE_TH_ERRORS
    std::vector<std::vector<Tensor>> fresh;
    if (!state.is_none()) fresh = copied_state(state);
    const py::gil_scoped_release no_gil;
    const std::lock_guard<std::mutex> lock(mutex_);
    states_ = std::move(fresh);
    END_HANDLE_TH_ERRORS_PYBIND
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }
  int64_t input_size() const { return input_size_; }

 private:
  // The streamer runs outside the dispatcher: nothing that would expect to see its work may be active.
  static void check_direct_call(const char* where) {
    TORCH_CHECK(!torch::jit::tracer::isTracing(), where,
                ": torch.jit.trace cannot record a streamer (it calls the engine directly); trace the module's "
                "stream or forward instead");
    TORCH_CHECK(!at::impl::torch_function_mode_enabled() && !c10::impl::dispatch_mode_enabled(), where,
                ": a streamer cannot run under a __torch_function__ or __torch_dispatch__ mode (it calls the engine "
                "directly); call the module instead");
  }

  void check_like_module(const char* where, const std::string& name, const Tensor& t) const {
    TORCH_CHECK_TYPE(t.scalar_type() == dtype_, where, ": ", name, " must have the module's dtype (", dtype_, "), got ",
                     t.scalar_type());
    TORCH_CHECK_VALUE(t.device() == device_, where, ": ", name, " must be on the module's device (", device_, "), got ",
                      t.device());
    TORCH_CHECK_VALUE(t.layout() == at::kStrided, where, ": ", name, " must be a strided (dense) tensor, got ",
                      t.layout());
  }

  // hx's tensors, checked, one (B, width) copy per layer and state.
  std::vector<std::vector<Tensor>> copied_state(py::handle state) const {
    std::vector<py::handle> given;
    if (widths_.size() == 1) {
      given.push_back(state);
    } else {
      TORCH_CHECK_TYPE(py::isinstance<py::tuple>(state) || py::isinstance<py::list>(state), kReset,
                       ": state must be None or a tuple (h, c), got ", Py_TYPE(state.ptr())->tp_name);
      for (py::handle s : py::reinterpret_borrow<py::sequence>(state)) given.push_back(s);
      TORCH_CHECK_VALUE(given.size() == widths_.size(), kReset, ": state must be a tuple (h, c), got ", given.size(),
                        " items");
    }
    const char* names[] = {"h", "c"};
    std::vector<std::vector<Tensor>> copies(layers_.size());
    int64_t batch = -1;
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (size_t s = 0; s < given.size(); ++s) {
      const std::string name = given.size() == 1 ? "state" : std::string("state ") + names[s];
      const Tensor& t = exact_tensor(given[s], kReset, name);
      check_like_module(kReset, name, t);
      if (batch < 0 && t.dim() == 3) batch = t.size(1);
      TORCH_CHECK_VALUE(t.dim() == 3 && t.size(0) == num_layers() && t.size(1) == batch &&
                            t.size(2) == widths_[s],
                        kReset, ": ", name, " must have shape (num_layers, batch, ", s == 0 ? "state_size" : "hidden_size",
                        ") = (", num_layers(), ", B, ", widths_[s], ")", s > 0 ? " with h's B" : "", ", got ",
                        t.sizes());
      for (size_t l = 0; l < layers_.size(); ++l) copies[l].push_back(t.select(0, l).clone(at::MemoryFormat::Contiguous));
    }
    return copies;
  }

  Tensor advance(const Tensor& input) {
    TORCH_CHECK_VALUE(input.dim() == 1 || input.dim() == 2, kStep,
                      ": input must be (batch, input_size) or (input_size,), got shape ", input.sizes());
    TORCH_CHECK_VALUE(input.size(-1) == input_size_, kStep, ": input.size(-1) must be input_size = ", input_size_,
                      ", got ", input.size(-1));
    check_like_module(kStep, "input", input);
    TORCH_CHECK_VALUE(!(at::GradMode::is_enabled() && input.requires_grad()), kStep,
                      ": a streamer runs inference only (it records no autograd graph), got an input that requires "
                      "grad; train through the module, or pass input.detach()");
    const int64_t batch = input.dim() == 2 ? input.size(0) : 1;
    if (!states_.empty()) {
      const int64_t state_batch = states_[0][0].size(0);
      TORCH_CHECK_VALUE(batch == state_batch, kStep, ": input has batch ", batch, " but the state batch ", state_batch,
                        " (", input.dim() == 1 ? "an input (input_size,) is batch 1" : "reset() starts a new state",
                        ")");
    }
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    const bool reduced = compute_ != dtype_;
    std::vector<std::vector<Tensor>> next(layers_.size());
    Tensor x = (input.dim() == 2 ? input : input.unsqueeze(0)).unsqueeze(0);  // (1, B, I)
    for (size_t l = 0; l < layers_.size(); ++l) {
      std::vector<Tensor> init;
      for (size_t s = 0; s < widths_.size(); ++s) {
        Tensor state = states_.empty() ? at::zeros({batch, widths_[s]}, input.options()) : states_[l][s];
        init.push_back(reduced ? state.to(compute_) : state);
      }
      const LayerWeights& w = layers_[l];
      RecurrentForward r = cell_.forward(reduced ? x.to(compute_) : x, init, w.weight_ih, w.weight_hh, w.bias_ih,
                                         w.bias_hh, w.weight_hr, std::nullopt, /*reverse=*/false,
                                         /*training=*/false, nullptr);
      x = reduced ? r.output.to(dtype_) : std::move(r.output);
      for (auto& f : r.final_states) next[l].push_back(reduced ? f.to(dtype_) : std::move(f));
    }
    states_ = std::move(next);  // only once every layer has run
    x = x.select(0, 0);
    return input.dim() == 2 ? x : x.select(0, 0);
  }

  const CellEntry& cell_;
  int64_t input_size_;
  std::vector<int64_t> widths_;
  at::ScalarType dtype_ = at::kFloat, compute_ = at::kFloat;
  c10::Device device_ = c10::Device(c10::kCPU);
  std::vector<LayerWeights> layers_;
  std::vector<std::vector<Tensor>> states_;  // per layer, per state (B, width) in dtype_; empty: zeros
  std::mutex mutex_;  // one step at a time: a step replaces the state
};

}  // namespace

void define_streamer(py::module_& module) {
  py::class_<Streamer>(module, "Streamer",
                       "Streaming inference, one time step per call, with the state kept inside: made by a "
                       "module's streamer() (rnnattn_ext.LSTM, GRU, RNN), from a snapshot of its weights")
      .def(py::init<const std::string&, const py::sequence&, int64_t, std::vector<int64_t>>(), py::arg("cell"),
           py::arg("layers"), py::arg("input_size"), py::arg("widths"),
           "cell: lstm, gru, rnn_tanh or rnn_relu; layers: per layer (weight_ih, weight_hh, bias_ih, bias_hh[, "
           "weight_hr]), copied; widths: each state's width (h first)")
      .def("step", &Streamer::step, py::arg("input"),
           "One time step: input (B, input_size) or (input_size,) gives the last layer's output (B, width) or "
           "(width,), and the state moves on. The first step after reset() with no state starts from zeros")
      .def_property_readonly("state", &Streamer::state,
                             "The state the next step starts from, as the module's hx: (num_layers, B, width) per "
                             "state, (h, c) for the LSTM; None before the first step. Fresh tensors")
      .def("reset", &Streamer::reset, py::arg("state") = py::none(),
           "Starts a new sequence: from `state` (the module's hx layout, copied), or zeros with None")
      .def_property_readonly("num_layers", &Streamer::num_layers)
      .def_property_readonly("input_size", &Streamer::input_size);
}

}  // namespace rnnattn
