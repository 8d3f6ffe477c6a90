// rnnattn_ext.Streamer (made by a module's streamer(), python/rnnattn_ext/modules.py and
// attention_modules.py): streaming inference one time step per call, the state kept inside. A module's
// streaming call (Python, the module call, the op through the dispatcher with its checks of every
// weight) costs about 20 µs more than the engine's own work on a 2-core x86, most of a small layer's
// step at batch 1. The streamer checks its weights once, when it is made, and each step checks its
// input and calls the engine. For the attention modules it also keeps each layer's self-memory slots
// where its steps read and write them (SlotStore), and computes an external memory's keys and
// values once instead of at every step; reset() may replace that memory (a decoder's next sequence
// without copying the weights again).
//
// Its weights (and external memory) are a snapshot: copies made with the streamer, so that nothing
// later done to the module (an optimizer step, load_state_dict, .to(), a replaced parameter) changes
// them under it or makes them disagree with what was checked. Inference only: no autograd graph is
// recorded. Each layer computes as the module's does (CPU float16/bfloat16 in float32, its output and
// states rounded back), so the steps give the module's numbers: bit for bit, but for the carried slots,
// which the module's stream computes again from the states (products of other shapes, equal to rounding).
#include "python_streamer.h"

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <pybind11/stl.h>
#include <torch/csrc/DynamicTypes.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/frontend/tracer.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "carried_slots.h"
#include "cells/all_cells.h"
#include "engine/recurrent_engine.h"
#include "ops/argument_checks.h"
#include "python_tensors.h"

namespace py = pybind11;

namespace rnnattn {
namespace {

using at::Tensor;

using ForwardFn = decltype(&recurrent_forward<LstmCell>);  // every cell's has this type

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
  if (found == cells.end()) {
    std::string names;
    for (const auto& entry : cells) names += (names.empty() ? "" : ", ") + entry.first;
    TORCH_CHECK_VALUE(false, "rnnattn_ext.Streamer: cell must be one of ", names, ", got ", cell);
  }
  return found->second;
}

constexpr const char* kMake = "rnnattn_ext.Streamer";
constexpr const char* kStep = "rnnattn_ext.Streamer.step";
constexpr const char* kReset = "rnnattn_ext.Streamer.reset";

// The attention modules' state type (python/rnnattn_ext/attention_modules.py).
py::object attention_state_class() {
  return py::module_::import("rnnattn_ext.attention_modules").attr("AttentionState");
}

// Names of a layer's weights in the order functional.stack / attention_stack take them.
constexpr const char* kBaseNames[] = {"weight_ih", "weight_hh", "bias_ih", "bias_hh"};
constexpr const char* kAttentionNames[] = {"weight_q", "bias_q", "weight_k", "bias_k", "weight_v", "bias_v",
                                           "weight_c"};

struct Layer {
  Tensor weight_ih, weight_hh;
  std::optional<Tensor> bias_ih, bias_hh, weight_hr;
  LayerShape shape;  // as the ops' checks found it, for one step of batch 1
  std::optional<AttentionConfig> attention;  // the attention modules' layers
  // Self memory of a CPU float16/bfloat16 module: W_k, W_v and their biases in its dtype, with which
  // it computes the slots it carries (the config's are in float32).
  Tensor carry_w_k, carry_w_v;
  std::optional<Tensor> carry_b_k, carry_b_v;
};

// The attention modules' settings, shared by every layer.
struct AttentionSettings {
  int64_t num_heads = 0;  // 0: a base module
  std::optional<int64_t> window;
};

// An external memory as a layer reads it: the memory (S, B, M) in the compute dtype (one copy for
// every layer), its lengths, and the layer's keys and values of it (B, S, D).
struct LayerMemory {
  Tensor memory, keys, values;
  std::optional<Tensor> lengths;
};

// A layer's self-memory slots, kept where its steps read and write them in place
// (AttentionConfig::store_keys): keys and values (B, C, D) in the compute dtype. With a window w, a
// ring of w slots stored twice (C = 2w; slot j at j mod w and at j mod w + w), so that the w - 1
// most recent and the step's new one lie next to each other wherever the ring has come to: a step
// reads [first, first + count), writes its new slot right after them and copies it to its twin.
// Copying every carried slot into the call's store and back out again cost an attention LSTM(256)'s
// step (window 64) about a tenth of its time. Without a window, slot j at j, C doubling when full.
struct SlotStore {
  Tensor keys, values;  // undefined before the first slot
  int64_t first = 0, count = 0;
  int64_t capacity() const { return keys.defined() ? keys.size(1) : 0; }
};

struct LayerState {
  std::vector<Tensor> states;  // (B, width) each, in the module's dtype
  SlotStore slots;             // self memory
};

// Slot `from` of every row of a store's keys or values (B, C, D) copied to slot `to`.
void copy_slot(const Tensor& store, int64_t from, int64_t to) {
  if (!store.is_cpu()) {
    store.select(1, to).copy_(store.select(1, from));
    return;
  }
  const int64_t rows = store.size(0), width = store.size(2), bytes = width * store.element_size();
  char* data = static_cast<char*>(store.data_ptr());
  for (int64_t b = 0; b < rows; ++b) {
    char* row = data + b * store.size(1) * bytes;
    std::memcpy(row + to * bytes, row + from * bytes, bytes);
  }
}

// An empty store of `batch` rows of `width` that will hold `count` slots: a window's ring twice, else
// room for twice as many (at least 16).
SlotStore new_store(int64_t batch, int64_t width, int64_t count, std::optional<int64_t> window,
                    const at::TensorOptions& options) {
  const int64_t capacity = window ? 2 * *window : std::max<int64_t>(16, 2 * (count + 1));
  return {at::empty({batch, capacity, width}, options), at::empty({batch, capacity, width}, options), 0, 0};
}

// `store` with room after its slots for one more: the same one, or (the first slot, or no window and
// a full store) a new one holding the same slots from slot 0.
SlotStore with_room(const SlotStore& store, int64_t batch, int64_t width, std::optional<int64_t> window,
                    const at::TensorOptions& options) {
  if (store.keys.defined() && store.first + store.count < store.capacity()) return store;
  SlotStore grown = new_store(batch, width, store.count, window, options);
  grown.count = store.count;
  if (store.count > 0) {
    grown.keys.narrow(1, 0, store.count).copy_(store.keys.narrow(1, store.first, store.count));
    grown.values.narrow(1, 0, store.count).copy_(store.values.narrow(1, store.first, store.count));
  }
  return grown;
}

// The store after a step wrote its new slot (right after store's slots; `store` has room for it).
SlotStore after_step(const SlotStore& store, std::optional<int64_t> window) {
  SlotStore next = store;
  if (!window) {
    ++next.count;
    return next;
  }
  const int64_t w = *window, written = store.first + store.count;
  if (w > 1) {
    const int64_t twin = written < w ? written + w : written - w;
    for (const Tensor* t : {&store.keys, &store.values}) copy_slot(*t, written, twin);
  }
  if (store.count + 1 < w) {
    ++next.count;
  } else {
    next.first = (store.first + 1) % w;  // the oldest leaves the window
  }
  return next;
}

class Streamer {
 public:
  // `layers`: per layer the weights functional.stack (or, with num_heads > 0, attention_stack) takes,
  // absent ones None; `widths`: each state's width (h first). With attention: its heads, self-memory
  // window, and the external memory (S, B, M) with its lengths, if any; `prepare_memory` turns the
  // memory and lengths reset() is given into those (the module's layout; None: reset takes them so).
  Streamer(const std::string& cell, const py::sequence& layers, int64_t input_size, std::vector<int64_t> widths,
           int64_t num_heads, std::optional<int64_t> window, py::handle memory, py::handle memory_lengths,
           py::handle prepare_memory)
      : cell_(cell_entry(cell)),
        cell_name_(cell),
        input_size_(input_size),
        widths_(std::move(widths)),
        prepare_memory_(py::reinterpret_borrow<py::object>(prepare_memory)) {
    TORCH_CHECK_VALUE(widths_.size() == cell_.states, "rnnattn_ext.Streamer: cell ", cell, " has ", cell_.states,
                      " state(s), got ", widths_.size(), " widths");
    TORCH_CHECK_VALUE(py::len(layers) > 0, "rnnattn_ext.Streamer: layers must hold at least one layer");
    TORCH_CHECK_VALUE(num_heads >= 0, "rnnattn_ext.Streamer: num_heads must be >= 0 (0: no attention), got ",
                      num_heads);
    const at::NoGradGuard no_grad;
    TORCH_CHECK_VALUE(num_heads > 0 || (memory.is_none() && memory_lengths.is_none()), kMake,
                      ": memory and memory_lengths need attention (num_heads > 0)");
    external_ = !memory.is_none();
    TORCH_CHECK_VALUE(external_ || memory_lengths.is_none(), kMake, ": memory_lengths needs a memory");
    const AttentionSettings settings{num_heads, window};
    for (size_t l = 0; l < py::len(layers); ++l) {
      layers_.push_back(make_layer(l, py::reinterpret_borrow<py::sequence>(layers[l]), settings));
    }
    if (external_) install(external_memory(kMake, memory, memory_lengths));
  }

  // One time step: input (B, input_size) or (input_size,); returns the last layer's output, (B, width)
  // or (width,), and with `need_weights` also each layer's attention weights of the step.
  py::object step(py::handle input_object, bool need_weights) {
    HANDLE_TH_ERRORS
    check_direct_call(kStep);
    TORCH_CHECK_VALUE(!need_weights || attention(), kStep,
                      ": need_weights is for the attention modules' streamers; this one has no attention");
    const Tensor& input = exact_tensor(input_object, kStep, "input");
    Tensor output;
    std::vector<Tensor> weights;
    {
      const py::gil_scoped_release no_gil;  // as the ops: other Python threads run meanwhile
      const std::lock_guard<std::mutex> lock(mutex_);
      output = advance(input, need_weights ? &weights : nullptr);
    }
    if (!need_weights) return wrap(std::move(output));
    py::list per_layer;
    for (auto& w : weights) per_layer.append(wrap(std::move(w)));
    return py::make_tuple(wrap(std::move(output)), per_layer);
    END_HANDLE_TH_ERRORS_PYBIND
  }

  // The state the next step starts from, as the module's stream returns it: per state (num_layers, B,
  // width), or (num_layers, width) after an unbatched step (the LSTM's as a tuple (h, c)), for the
  // attention modules an AttentionState; None before the first step and after reset().
  py::object state() {
    HANDLE_TH_ERRORS
    std::vector<Tensor> stacked;  // fresh tensors: changing them changes nothing inside
    std::vector<Tensor> keys_of_layers, values_of_layers;
    {
      const py::gil_scoped_release no_gil;
      const std::lock_guard<std::mutex> lock(mutex_);
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      for (size_t s = 0; s < widths_.size() && !state_.empty(); ++s) {
        std::vector<Tensor> per_layer;
        for (const auto& layer : state_) per_layer.push_back(layer.states[s]);
        stacked.push_back(unbatched_ ? at::stack(per_layer, 0).select(1, 0) : at::stack(per_layer, 0));
      }
      for (const auto& layer : state_) {
        auto [keys, values] = carried(layer.slots);
        keys_of_layers.push_back(std::move(keys));
        values_of_layers.push_back(std::move(values));
      }
    }
    if (stacked.empty()) return py::none();
    if (!attention()) {
      if (stacked.size() == 1) return wrap(std::move(stacked[0]));
      return py::make_tuple(wrap(std::move(stacked[0])), wrap(std::move(stacked[1])));
    }
    py::object keys = py::none(), values = py::none();
    if (self_memory()) {
      py::list k, v;
      for (size_t l = 0; l < keys_of_layers.size(); ++l) {
        k.append(wrap(std::move(keys_of_layers[l])));
        v.append(wrap(std::move(values_of_layers[l])));
      }
      keys = k;
      values = v;
    }
    return attention_state_class()(wrap(std::move(stacked[0])), stacked.size() > 1 ? wrap(std::move(stacked[1])) : py::none(),
                       keys, values);
    END_HANDLE_TH_ERRORS_PYBIND
  }

  // Starts a new sequence: from `state` (what `state` reads, copied), or from zeros with None; over a
  // new external memory when one is given (copied, its keys and values made), else the same one.
  void reset(py::handle state, py::handle memory, py::handle memory_lengths) {
    HANDLE_TH_ERRORS
    std::optional<std::vector<LayerMemory>> new_memory;
    if (!memory.is_none()) {
      TORCH_CHECK_VALUE(external_, kReset, ": memory replaces the external memory of a streamer made with one; this ",
                        attention() ? "one attends over its own past states (self memory)" : "one has no attention");
      if (prepare_memory_.is_none()) {
        new_memory = external_memory(kReset, memory, memory_lengths);
      } else {
        const auto prepared = prepare_memory_(memory, memory_lengths).cast<py::tuple>();
        new_memory = external_memory(kReset, py::object(prepared[0]), py::object(prepared[1]));
      }
    } else {
      TORCH_CHECK_VALUE(memory_lengths.is_none(), kReset,
                        ": memory_lengths comes with a new memory (without one the memory and its lengths stay)");
    }
    std::vector<LayerState> fresh;
    bool unbatched = false;
    if (!state.is_none()) fresh = copied_state(state, unbatched);
    const py::gil_scoped_release no_gil;
    const std::lock_guard<std::mutex> lock(mutex_);
    if (!fresh.empty()) {
      const int64_t batch = fresh[0].states[0].size(0);
      if (new_memory) {
        const int64_t memory_batch = new_memory->front().memory.size(1);
        TORCH_CHECK_VALUE(batch == memory_batch, kReset, ": state has batch ", batch, " but the new memory batch ",
                          memory_batch);
      } else {
        check_batch(kReset, "state", batch);
      }
    }
    if (new_memory) install(std::move(*new_memory));
    state_ = std::move(fresh);
    unbatched_ = unbatched;
    END_HANDLE_TH_ERRORS_PYBIND
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }
  int64_t input_size() const { return input_size_; }

  std::string repr() {
    std::ostringstream out;
    out << "rnnattn_ext.Streamer(cell=" << cell_name_ << ", num_layers=" << num_layers()
        << ", input_size=" << input_size_ << ", dtype="
        << py::str(py::handle(reinterpret_cast<PyObject*>(torch::getTHPDtype(dtype_)))).cast<std::string>()
        << ", device=" << device_;
    const py::gil_scoped_release no_gil;
    const std::lock_guard<std::mutex> lock(mutex_);  // reset() may replace the memory
    if (attention()) {
      const AttentionConfig& a = *layers_[0].attention;
      out << ", num_heads=" << a.num_heads;
      if (a.memory) out << ", memory=" << a.memory->sizes();
      else if (a.window) out << ", window=" << *a.window;
    }
    out << ", state=";
    if (state_.empty()) out << "None)";
    else if (unbatched_) out << "unbatched)";
    else out << "batch " << state_[0].states[0].size(0) << ")";
    return out.str();
  }

 private:
  bool attention() const { return layers_[0].attention.has_value(); }
  bool self_memory() const { return attention() && !external_; }

  // The snapshot of layer l's weights, checked by the ops' own checks.
  Layer make_layer(size_t l, const py::sequence& parts, const AttentionSettings& settings) {
    const std::string where = "rnnattn_ext.Streamer, layer " + std::to_string(l);
    const bool attention = settings.num_heads > 0;
    const size_t base = attention ? 11 : 4;
    TORCH_CHECK_VALUE(py::len(parts) == base || py::len(parts) == base + 1, where, ": expected ", base, " or ",
                      base + 1, " weights (the last one weight_hr), got ", py::len(parts));
    std::vector<std::optional<Tensor>> given;  // in the module's dtype; copies are made below
    for (size_t i = 0; i < py::len(parts); ++i) {
      const std::string name = i == base ? "weight_hr" : i < 4 ? kBaseNames[i] : kAttentionNames[i - 4];
      const bool optional = name.rfind("bias_", 0) == 0;
      if (parts[i].is_none()) {
        TORCH_CHECK_TYPE(optional, where, ": ", name, " must be a tensor, got None");
        given.emplace_back();
        continue;
      }
      const Tensor& t = exact_tensor(parts[i], where.c_str(), name);
      if (l == 0 && i == 0) {
        dtype_ = t.scalar_type();
        device_ = t.device();
        // The module computes CPU float16/bfloat16 in float32 (functional.layer).
        const bool reduced = t.is_cpu() && (dtype_ == at::kHalf || dtype_ == at::kBFloat16);
        compute_ = reduced ? at::kFloat : dtype_;
      }
      TORCH_CHECK_TYPE(t.scalar_type() == dtype_, where, ": ", name, " must have the dtype of weight_ih_l0 (", dtype_,
                       "), got ", t.scalar_type());
      given.emplace_back(t.detach());
    }
    given.resize(base + 1);
    auto copy = [&](const std::optional<Tensor>& t) -> std::optional<Tensor> {
      if (!t) return std::nullopt;
      return t->to(t->options().dtype(compute_), /*non_blocking=*/false, /*copy=*/true, at::MemoryFormat::Contiguous);
    };
    Layer layer{*copy(given[0]), *copy(given[1]), copy(given[2]), copy(given[3]), copy(given[base])};
    // The op's own checks, against an input and states of the layer's shapes.
    const Tensor input = probe_input(l, 1);
    std::vector<Tensor> states;
    std::vector<NamedTensor> named;
    const char* state_names[] = {"h0", "c0"};
    for (const int64_t width : widths_) states.push_back(at::empty({1, width}, input.options()));
    for (size_t s = 0; s < widths_.size(); ++s) named.push_back({state_names[s], states[s]});
    layer.shape = check_layer_forward(where.c_str(), cell_.gates, input, named, layer.weight_ih, layer.weight_hh,
                                      layer.bias_ih, layer.bias_hh, layer.weight_hr);
    if (!attention) return layer;

    AttentionConfig config;
    config.weight_q = *copy(given[4]);
    config.bias_q = copy(given[5]);
    config.weight_k = *copy(given[6]);
    config.bias_k = copy(given[7]);
    config.weight_v = *copy(given[8]);
    config.bias_v = copy(given[9]);
    config.weight_c = *copy(given[10]);
    config.num_heads = settings.num_heads;
    config.window = settings.window;
    // An external memory's layer is checked with its memory (external_memory).
    if (!external_) check_attention(where.c_str(), cell_.gates, layer.shape, input, config);
    if (!external_ && compute_ != dtype_) {
      // The module computes the carried slots' keys and values in its own dtype.
      auto own = [](const std::optional<Tensor>& t) {
        return t ? std::optional<Tensor>(t->clone(at::MemoryFormat::Contiguous)) : std::nullopt;
      };
      layer.carry_w_k = *own(given[6]);
      layer.carry_w_v = *own(given[8]);
      layer.carry_b_k = own(given[7]);
      layer.carry_b_v = own(given[9]);
    }
    layer.attention = std::move(config);
    return layer;
  }

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

  // Layer l's input for the ops' checks, of one step and `batch` rows (they read its shape and kind).
  Tensor probe_input(size_t l, int64_t batch) const {
    return at::empty({1, batch, l == 0 ? input_size_ : widths_[0]},
                     at::TensorOptions().dtype(compute_).device(device_));
  }

  // An external memory (S, B, M) and its lengths (B,) int64 or None, checked against every layer as the
  // ops check them, copied, with each layer's keys and values: every step reads the same ones, so they
  // are made once, as each call of the op would make them.
  std::vector<LayerMemory> external_memory(const char* where, py::handle memory_object,
                                           py::handle lengths_object) const {
    const Tensor& memory = exact_tensor(memory_object, where, "memory");
    check_like_module(where, "memory", memory);
    const at::NoGradGuard no_grad;
    const Tensor copy = memory.to(memory.options().dtype(compute_), /*non_blocking=*/false, /*copy=*/true,
                                  at::MemoryFormat::Contiguous);
    std::optional<Tensor> lengths;
    if (!lengths_object.is_none()) lengths = exact_tensor(lengths_object, where, "memory_lengths").clone();
    const int64_t batch = copy.dim() == 3 ? copy.size(1) : 1;  // check_attention names any other shape
    const py::gil_scoped_release no_gil;  // the keys and values are products: Python threads run meanwhile
    std::vector<AttentionConfig> probes;
    {
      const std::lock_guard<std::mutex> lock(mutex_);  // another reset() may be replacing their memory
      for (const auto& layer : layers_) probes.push_back(*layer.attention);
    }
    std::vector<LayerMemory> per_layer;
    for (size_t l = 0; l < layers_.size(); ++l) {
      const std::string name = std::string(where) + ", layer " + std::to_string(l);
      AttentionConfig& probe = probes[l];
      probe.memory = copy;
      probe.memory_lengths = lengths;
      LayerShape shape = layers_[l].shape;
      shape.batch = batch;
      check_attention(name.c_str(), cell_.gates, shape, probe_input(l, batch), probe);
      const auto size = std::vector<int64_t>{copy.size(1), copy.size(0), probe.weight_q.size(0)};
      LayerMemory m{copy, at::empty(size, copy.options()), at::empty(size, copy.options()), lengths};
      external_keys_values(probe, m.keys, m.values);
      per_layer.push_back(std::move(m));
    }
    return per_layer;
  }

  // Makes `memory` the one every step attends over; the caller holds the mutex (or is the constructor).
  void install(std::vector<LayerMemory> memory) {
    for (size_t l = 0; l < layers_.size(); ++l) {
      AttentionConfig& config = *layers_[l].attention;
      config.memory = memory[l].memory;
      config.memory_lengths = memory[l].lengths;
      config.memory_keys = memory[l].keys;
      config.memory_values = memory[l].values;
    }
    memory_batch_ = memory.front().memory.size(1);
  }

  // reset()'s state, checked and copied as the steps keep it ((B, width) per layer and state; an
  // unbatched one, (num_layers, width) as stream returns it after unbatched input, as batch 1).
  std::vector<LayerState> copied_state(py::handle state, bool& unbatched) const {
    py::object hx = py::reinterpret_borrow<py::object>(state), keys = py::none(), values = py::none();
    if (attention()) {
      TORCH_CHECK_TYPE(py::isinstance(state, attention_state_class()), kReset,
                       ": state must be None or an AttentionState (what state reads), got ",
                       Py_TYPE(state.ptr())->tp_name);
      hx = widths_.size() == 1 ? py::object(state.attr("h")) : py::object(py::make_tuple(state.attr("h"), state.attr("c")));
      keys = state.attr("keys");
      values = state.attr("values");
    }
    std::vector<py::handle> given;
    if (widths_.size() == 1) {
      given.push_back(hx);
    } else {
      TORCH_CHECK_TYPE(py::isinstance<py::tuple>(hx) || py::isinstance<py::list>(hx), kReset,
                       ": state must be None or a tuple (h, c), got ", Py_TYPE(hx.ptr())->tp_name);
      for (py::handle s : py::reinterpret_borrow<py::sequence>(hx)) given.push_back(s);
      TORCH_CHECK_VALUE(given.size() == widths_.size(), kReset, ": state must be a tuple (h, c), got ", given.size(),
                        " items");
    }
    const char* names[] = {"h", "c"};
    std::vector<LayerState> copies(layers_.size());
    int64_t batch = -1;
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (size_t s = 0; s < given.size(); ++s) {
      const std::string name = given.size() == 1 ? "state" : std::string("state ") + names[s];
      const Tensor& t = exact_tensor(given[s], kReset, name);
      check_like_module(kReset, name, t);
      if (s == 0) {
        unbatched = t.dim() == 2;
        batch = t.dim() == 3 ? t.size(1) : 1;
      }
      const Tensor batched = unbatched && t.dim() == 2 ? t.unsqueeze(1) : t;
      const char* width = s == 0 ? "state_size" : "hidden_size";
      TORCH_CHECK_VALUE(t.dim() == (unbatched ? 2 : 3) && t.size(0) == num_layers() && batched.size(1) == batch &&
                            t.size(-1) == widths_[s],
                        kReset, ": ", name, " must have shape (num_layers, batch, ", width, ") = (", num_layers(),
                        ", B, ", widths_[s], ") or, unbatched, (num_layers, ", width, ") = (", num_layers(), ", ",
                        widths_[s], ")", s > 0 ? ", batched or not as h, with h's B" : "", ", got ", t.sizes());
      for (size_t l = 0; l < layers_.size(); ++l) {
        copies[l].states.push_back(batched.select(0, l).clone(at::MemoryFormat::Contiguous));
      }
    }
    if (!self_memory()) {
      TORCH_CHECK_VALUE(keys.is_none() && values.is_none(), kReset,
                        ": state.keys and state.values must be None with an external memory");
      return copies;
    }
    std::vector<Tensor> past_keys(layers_.size()), past_values(layers_.size());  // (P, B, D) or undefined
    for (auto [slots, name, past] :
         {std::tuple{keys, "keys", &past_keys}, std::tuple{values, "values", &past_values}}) {
      if (slots.is_none()) continue;
      TORCH_CHECK_TYPE(py::isinstance<py::list>(slots) || py::isinstance<py::tuple>(slots), kReset, ": state.", name,
                       " must be None or a list with one entry per layer, got ", Py_TYPE(slots.ptr())->tp_name);
      const auto per_layer = py::reinterpret_borrow<py::sequence>(slots);
      TORCH_CHECK_VALUE(static_cast<int64_t>(py::len(per_layer)) == num_layers(), kReset, ": state.", name,
                        " must have one entry per layer (", num_layers(), "), got ", py::len(per_layer));
      for (size_t l = 0; l < layers_.size(); ++l) {
        if (per_layer[l].is_none()) continue;
        const std::string label = std::string("state.") + name + "[" + std::to_string(l) + "]";
        const Tensor& t = exact_tensor(per_layer[l], kReset, label);
        check_like_module(kReset, label, t);
        const int64_t width = layers_[l].attention->weight_q.size(0);
        TORCH_CHECK_VALUE(t.dim() == 3 && t.size(1) == batch && t.size(2) == width, kReset, ": ", label,
                          " must have shape (P, B, D) = (P, ", batch, ", ", width, "), got ", t.sizes());
        (*past)[l] = t;
      }
    }
    for (size_t l = 0; l < layers_.size(); ++l) {
      const Tensor &k = past_keys[l], &v = past_values[l];
      TORCH_CHECK_VALUE(k.defined() == v.defined() && (!k.defined() || k.size(0) == v.size(0)), kReset,
                        ": state.keys[", l, "] and state.values[", l, "] must come together, with as many slots");
      if (k.defined()) copies[l].slots = store_of(k, v, layers_[l].attention->window);
    }
    return copies;
  }

  // A store (SlotStore) of the slots a step reads of past keys and values (P, B, D) in the module's
  // dtype: every one without a window, else the window's w - 1 most recent.
  SlotStore store_of(const Tensor& keys, const Tensor& values, std::optional<int64_t> window) const {
    const int64_t slots = keys.size(0), kept = window ? std::min(slots, *window - 1) : slots;
    SlotStore store = new_store(keys.size(1), keys.size(2), kept, window, keys.options().dtype(compute_));
    store.count = kept;
    for (auto [from, into] : {std::pair{&keys, &store.keys}, std::pair{&values, &store.values}}) {
      const Tensor recent = from->narrow(0, slots - kept, kept).transpose(0, 1);
      into->narrow(1, 0, kept).copy_(recent);
      if (window) into->narrow(1, *window, kept).copy_(recent);  // their twins
    }
    return store;
  }

  // A store's slots as the module's stream carries them: (P, B, D) in the module's dtype, fresh
  // tensors; undefined while there are none.
  std::pair<Tensor, Tensor> carried(const SlotStore& store) const {
    if (store.count == 0) return {};
    auto slots = [&](const Tensor& t) {
      return t.narrow(1, store.first, store.count)
          .transpose(0, 1)
          .to(t.options().dtype(dtype_), /*non_blocking=*/false, /*copy=*/true, at::MemoryFormat::Contiguous);
    };
    return {slots(store.keys), slots(store.values)};
  }

  // An external memory fixes the batch.
  void check_batch(const char* where, const char* name, int64_t batch) const {
    TORCH_CHECK_VALUE(memory_batch_ < 0 || batch == memory_batch_, where, ": ", name, " has batch ", batch,
                      " but the memory batch ", memory_batch_,
                      " (the streamer's memory, given when it was made or to reset())");
  }

  // One step through every layer; `weights`, when given, receives each layer's attention weights
  // (B, heads, slots), or (heads, slots) for an input (input_size,).
  Tensor advance(const Tensor& input, std::vector<Tensor>* weights) {
    TORCH_CHECK_VALUE(input.dim() == 1 || input.dim() == 2, kStep,
                      ": input must be (batch, input_size) or (input_size,), got shape ", input.sizes());
    TORCH_CHECK_VALUE(input.size(-1) == input_size_, kStep, ": input.size(-1) must be input_size = ", input_size_,
                      ", got ", input.size(-1));
    check_like_module(kStep, "input", input);
    TORCH_CHECK_VALUE(!(at::GradMode::is_enabled() && input.requires_grad()), kStep,
                      ": a streamer runs inference only (it records no autograd graph), got an input that requires "
                      "grad; train through the module, or pass input.detach()");
    const int64_t batch = input.dim() == 2 ? input.size(0) : 1;
    check_batch(kStep, "input", batch);
    if (!state_.empty()) {
      const int64_t state_batch = state_[0].states[0].size(0);
      TORCH_CHECK_VALUE(batch == state_batch, kStep, ": input has batch ", batch, " but the state batch ", state_batch,
                        " (", input.dim() == 1 ? "an input (input_size,) is batch 1" : "reset() starts a new state",
                        ")");
    }
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    const bool reduced = compute_ != dtype_;
    auto computed = [&](const Tensor& t) { return reduced && t.defined() ? t.to(compute_) : t; };
    auto rounded = [&](Tensor t) { return reduced ? t.to(dtype_) : t; };
    std::vector<LayerState> next(layers_.size());
    // (1, B, I) and, at the end, the last layer's (B, width) or (width,): one view each way (views
    // cost a dispatcher call each, a noticeable part of a small layer's step).
    const int64_t row_stride = input.dim() == 2 ? input.stride(0) : input_size_ * input.stride(0);
    Tensor x = input.as_strided({1, batch, input_size_}, {batch * row_stride, row_stride, input.stride(-1)});
    for (size_t l = 0; l < layers_.size(); ++l) {
      std::vector<Tensor> initial, init;
      for (size_t s = 0; s < widths_.size(); ++s) {
        initial.push_back(state_.empty() ? at::zeros({batch, widths_[s]}, input.options()) : state_[l].states[s]);
        init.push_back(computed(initial.back()));
      }
      const Layer& w = layers_[l];
      std::optional<AttentionConfig> config = w.attention;
      const bool self_memory = config && !config->memory;
      SlotStore store;  // self memory: the slots before this step, with room after them for its own
      if (self_memory) {
        store = with_room(state_.empty() ? SlotStore{} : state_[l].slots, batch, config->weight_q.size(0),
                          config->window, input.options().dtype(compute_));
        config->store_keys = store.keys;
        config->store_values = store.values;
        config->store_first = store.first;
        config->store_past = store.count;
      }
      if (config) config->need_weights = weights != nullptr;
      RecurrentForward r = cell_.forward(computed(x), init, w.weight_ih, w.weight_hh, w.bias_ih, w.bias_hh,
                                         w.weight_hr, std::nullopt, /*reverse=*/false, /*training=*/false,
                                         config ? &*config : nullptr);
      x = rounded(std::move(r.output));
      for (auto& f : r.final_states) next[l].states.push_back(rounded(std::move(f)));
      if (weights) {
        const Tensor w = rounded(r.attention.select(0, 0));  // (B, heads, slots)
        weights->push_back(input.dim() == 2 ? w : w.select(0, 0));
      }
      if (self_memory) {
        // The step wrote its new slot into the store (the module's stream computes it again for the
        // next call, with the same products: the same numbers), except where the module carries it
        // in its own dtype, computed from the rounded state (functional.carried_slots).
        if (reduced && config->window != 1) {
          const auto [k, v] = carried_slots(initial[0], x, w.carry_w_k, w.carry_b_k, w.carry_w_v, w.carry_b_v,
                                            std::nullopt, std::nullopt, 1);
          const int64_t written = store.first + store.count;
          store.keys.select(1, written).copy_(k.select(0, 0));
          store.values.select(1, written).copy_(v.select(0, 0));
        }
        next[l].slots = after_step(store, config->window);
      }
    }
    state_ = std::move(next);  // only once every layer has run
    unbatched_ = input.dim() == 1;
    const int64_t width = x.size(2);
    return input.dim() == 2 ? x.as_strided({batch, width}, {x.stride(1), x.stride(2)})
                            : x.as_strided({width}, {x.stride(2)});
  }

  const CellEntry& cell_;
  std::string cell_name_;
  int64_t input_size_;
  std::vector<int64_t> widths_;
  at::ScalarType dtype_ = at::kFloat, compute_ = at::kFloat;
  c10::Device device_ = c10::Device(c10::kCPU);
  bool external_ = false;      // attends over an external memory (which reset() may replace)
  int64_t memory_batch_ = -1;  // an external memory's batch, which every step must have
  // The state reads unbatched, (num_layers, width), as stream returns it after unbatched input: the
  // last step's input was (input_size,), or reset() took such a state.
  bool unbatched_ = false;
  py::object prepare_memory_;  // reset()'s memory and lengths -> (S, B, M), (B,) int64 or None
  std::vector<Layer> layers_;
  std::vector<LayerState> state_;  // per layer; empty: zeros, no past slots
  mutable std::mutex mutex_;  // one step at a time: a step replaces the state
};

}  // namespace

void define_streamer(py::module_& module) {
  py::class_<Streamer>(module, "Streamer",
                       "Streaming inference, one time step per call, with the state kept inside: made by a "
                       "module's streamer() (rnnattn_ext.LSTM, GRU, RNN and the attention modules), from a snapshot "
                       "of its weights")
      .def(py::init<const std::string&, const py::sequence&, int64_t, std::vector<int64_t>, int64_t,
                    std::optional<int64_t>, py::handle, py::handle, py::handle>(),
           py::arg("cell"), py::arg("layers"), py::arg("input_size"), py::arg("widths"), py::arg("num_heads") = 0,
           py::arg("window") = py::none(), py::arg("memory") = py::none(), py::arg("memory_lengths") = py::none(),
           py::arg("prepare_memory") = py::none(),
           "cell: lstm, gru, rnn_tanh or rnn_relu; layers: per layer the weights functional.stack takes (with "
           "num_heads > 0: attention_stack), copied; widths: each state's width (h first); num_heads, window, "
           "memory (S, B, M) and memory_lengths (B,) int64: the attention modules' (the memory copied); "
           "prepare_memory: a function that turns the memory and lengths reset() takes into those (None: "
           "reset() takes them in this layout)")
      .def("step", &Streamer::step, py::arg("input"), py::arg("need_weights") = false,
           "One time step: input (B, input_size) or (input_size,) gives the last layer's output (B, width) or "
           "(width,), and the state moves on. The first step after reset() with no state starts from zeros. "
           "With need_weights (attention modules): (output, weights), weights a list with each layer's "
           "attention weights of this step, (B, num_heads, slots) or (num_heads, slots): the memory's S "
           "positions, or the self memory's window (the most recent state last, zeros where none is yet), "
           "unbounded: every state so far")
      .def_property_readonly("state", &Streamer::state,
                             "The state the next step starts from, as the module's stream returns it ((num_layers, "
                             "B, width) per state, (num_layers, width) after an unbatched step, (h, c) for the "
                             "LSTM, an AttentionState for the attention modules); None before the first step. "
                             "Fresh tensors")
      .def("reset", &Streamer::reset, py::arg("state") = py::none(), py::arg("memory") = py::none(),
           py::arg("memory_lengths") = py::none(),
           "Starts a new sequence: from `state` (as `state` or the module's stream gives it, batched or "
           "unbatched, copied), or zeros with None. A streamer "
           "made with an external memory attends over `memory` (with `memory_lengths`) from then on when one "
           "is given (copied, in the module's layout, any batch), else over the same one")
      .def("__repr__", &Streamer::repr)
      .def_property_readonly("num_layers", &Streamer::num_layers)
      .def_property_readonly("input_size", &Streamer::input_size);
}

}  // namespace rnnattn
