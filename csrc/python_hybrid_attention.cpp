// The hybrid block's attention position by position in C++ (engine/one_query_attention.h), float32
// on the CPU, without autograd (python/rnnattn_ext/hybrid.py):
// - _C.HybridAttentionStep: HybridStreamer's step on a packed copy of the weights. The streamer owns
//   the cache of keys and values, (B, capacity, D) each, and tells each step where its positions lie;
//   the step writes its own position's key and value there and returns the block's output.
// - _C.hybrid_stream_attention: HybridBlock.stream's attention for a chunk of a few steps at a few
//   batch rows, step by step on the module's live weights read in place, the past keys and values as
//   its state holds them. Where it does not apply it returns None and the stream takes its torch
//   operations (which explain bad arguments); through them a one-step chunk cost ~330 µs of a dozen
//   small ops on a 2-core x86.
#include "python_hybrid_attention.h"

#include <ATen/autocast_mode.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/empty.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>

#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "engine/one_query_attention.h"
#include "engine/unit_blocks.h"
#include "python_tensors.h"

namespace py = pybind11;

namespace rnnattn {
namespace {

using at::Tensor;

constexpr const char* kMake = "rnnattn_ext._C.HybridAttentionStep";
constexpr const char* kStep = "rnnattn_ext._C.HybridAttentionStep.step";

// A float32 CPU tensor of the given sizes (-1: any), contiguous.
Tensor float_cpu(py::handle object, const char* where, const std::string& name, std::vector<int64_t> sizes) {
  const Tensor& t = exact_tensor(object, where, name);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat && t.is_cpu(), where, ": ", name,
                   " must be a float32 CPU tensor, got ", t.scalar_type(), " on ", t.device());
  bool fits = t.dim() == static_cast<int64_t>(sizes.size());
  for (size_t i = 0; fits && i < sizes.size(); ++i) fits = sizes[i] < 0 || t.size(i) == sizes[i];
  std::string expected = "(";
  for (size_t i = 0; i < sizes.size(); ++i) {
    expected += (i ? ", " : "") + (sizes[i] < 0 ? std::string("any") : std::to_string(sizes[i]));
  }
  TORCH_CHECK_VALUE(fits, where, ": ", name, " must have shape ", expected, "), got ", t.sizes());
  return t.contiguous();
}

std::optional<Tensor> optional_float_cpu(py::handle object, const char* where, const std::string& name,
                                         int64_t size) {
  if (object.is_none()) return std::nullopt;
  return float_cpu(object, where, name, {size});
}

class HybridAttentionStep {
 public:
  HybridAttentionStep(py::handle qkv_weight, py::handle qkv_bias, py::handle out_weight, py::handle out_bias,
                      int64_t num_heads, int64_t head_dim)
      : engine_(make(qkv_weight, qkv_bias, out_weight, out_bias, num_heads, head_dim)) {}

  py::object step(py::handle y_object, py::handle keys_object, py::handle values_object, int64_t first,
                  int64_t count) {
    const int64_t width = engine_.width(), d = engine_.attention_width();
    const Tensor y = float_cpu(y_object, kStep, "y", {-1, width});
    const int64_t batch = y.size(0);
    // The cache is written in place: contiguous as given, no copy.
    const Tensor& keys = exact_tensor(keys_object, kStep, "keys");
    const Tensor& values = exact_tensor(values_object, kStep, "values");
    for (const auto& [name, t] : {std::pair<const char*, const Tensor*>{"keys", &keys}, {"values", &values}}) {
      TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat && t->is_cpu(), kStep, ": ", name,
                       " must be a float32 CPU tensor, got ", t->scalar_type(), " on ", t->device());
      TORCH_CHECK_VALUE(t->dim() == 3 && t->size(0) == batch && t->size(2) == d && t->is_contiguous(), kStep, ": ",
                        name, " must be a contiguous (batch, capacity, num_heads * head_dim) = (", batch,
                        ", capacity, ", d, ") tensor, got ", t->sizes(), t->is_contiguous() ? "" : " (not contiguous)");
    }
    TORCH_CHECK_VALUE(values.sizes() == keys.sizes(), kStep, ": values must have the shape of keys ", keys.sizes(),
                      ", got ", values.sizes());
    const int64_t capacity = keys.size(1);
    TORCH_CHECK_VALUE(first >= 0 && count >= 0 && first < capacity && count < capacity - first, kStep,
                      ": the past positions [first, first + count) and the step's own at first + count must lie in "
                      "the cache's ", capacity, " positions, got first = ", first, ", count = ", count);
    Tensor out = at::empty({batch, width}, y.options());
    {
      const py::gil_scoped_release no_gil;
      const std::lock_guard<std::mutex> lock(mutex_);  // the engine's workspace is one step's
      const int64_t threads = cpu_threads_for(4 * width * d, batch, /*steps=*/1, LoopPass::forward);
      engine_.step(y.data_ptr<float>(), batch, keys.data_ptr<float>(), values.data_ptr<float>(), capacity, first,
                   count, out.data_ptr<float>(), threads);
    }
    return wrap(std::move(out));
  }

 private:
  static OneQueryAttention make(py::handle qkv_weight, py::handle qkv_bias, py::handle out_weight,
                                py::handle out_bias, int64_t num_heads, int64_t head_dim) {
    TORCH_CHECK_VALUE(num_heads >= 1 && head_dim >= 1, kMake, ": num_heads and head_dim must be positive, got ",
                      num_heads, " and ", head_dim);
    const int64_t d = num_heads * head_dim;
    const Tensor qkv = float_cpu(qkv_weight, kMake, "qkv_weight", {3 * d, -1});
    const int64_t width = qkv.size(1);
    const Tensor out = float_cpu(out_weight, kMake, "out_weight", {width, d});
    const auto qkv_b = optional_float_cpu(qkv_bias, kMake, "qkv_bias", 3 * d);
    const auto out_b = optional_float_cpu(out_bias, kMake, "out_bias", width);
    return OneQueryAttention(qkv.data_ptr<float>(), qkv_b ? qkv_b->data_ptr<float>() : nullptr, out.data_ptr<float>(),
                             out_b ? out_b->data_ptr<float>() : nullptr, width, num_heads, head_dim);
  }

  OneQueryAttention engine_;
  std::mutex mutex_;
};

// The most steps of a chunk that hybrid_stream_attention takes, one after the other, each reading
// the weights again: the torch operations' products over the whole chunk catch up at about 64 steps
// (GRU and LSTM(256) blocks, 4 heads x 64, window 64, batch 4 on a 2-core x86: 16 steps 1.26x faster
// here, 32 steps 1.08x, 64 steps even).
constexpr int64_t kMostStreamSteps = 16;

// A plain float32 CPU tensor of exactly these sizes, or null.
const Tensor* plain_float_cpu(py::handle object, c10::IntArrayRef sizes) {
  const Tensor* t = plain_tensor(object);
  return t && t->scalar_type() == at::kFloat && t->is_cpu() && t->sizes().equals(sizes) ? t : nullptr;
}

// Positions [from, from + count) of a state's keys or values (B, heads, P, head_dim), any strides,
// into a cache's first `count` positions (B, capacity, heads * head_dim).
void copy_positions(const Tensor& state, int64_t from, int64_t count, float* cache, int64_t capacity) {
  const int64_t batch = state.size(0), heads = state.size(1), head_dim = state.size(3);
  const int64_t batch_stride = state.stride(0), head_stride = state.stride(1), position_stride = state.stride(2),
                element_stride = state.stride(3);
  const float* data = state.const_data_ptr<float>();
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t s = 0; s < count; ++s) {
      for (int64_t h = 0; h < heads; ++h) {
        const float* source = data + b * batch_stride + h * head_stride + (from + s) * position_stride;
        float* target = cache + ((b * capacity + s) * heads + h) * head_dim;
        if (element_stride == 1) {
          std::copy_n(source, head_dim, target);
        } else {
          for (int64_t i = 0; i < head_dim; ++i) target[i] = source[i * element_stride];
        }
      }
    }
  }
}

// HybridBlock.stream's attention for a chunk of a few steps (see the top of this file): y (T, B, W)
// the recurrent output of the chunk; the query, key, value and output projections' weights and biases (a
// bias may be None); past_keys/past_values (B, heads, P, head_dim) or both None; window None or
// >= 1. Returns (output (T, B, W), keys, values): the state's keys and values after the chunk,
// (B, heads, kept, head_dim) views of one new cache, or None for none (window 1). None where it does
// not apply: anything but plain float32 CPU tensors of the expected shapes, more than a few steps or
// batch rows (each reads the weights again: the torch operations' batched products win past them),
// autograd needed, autocast, a __torch_function__ or __torch_dispatch__ mode, or torch.jit.trace.
py::object hybrid_stream_attention(py::handle y_object, py::handle query_weight, py::handle query_bias,
                                   py::handle key_weight, py::handle key_bias, py::handle value_weight,
                                   py::handle value_bias, py::handle out_weight, py::handle out_bias,
                                   int64_t num_heads, int64_t head_dim, std::optional<int64_t> window,
                                   py::handle past_keys_object, py::handle past_values_object) {
  // (Outside the dispatcher: a __torch_dispatch__ mode would not see the work either.)
  const Tensor* given_y = plain_tensor(y_object);
  if (!plain_call() || c10::impl::dispatch_mode_enabled() || at::autocast::is_autocast_enabled(at::kCPU) ||
      num_heads < 1 || head_dim < 1 || (window && *window < 1) || given_y == nullptr || given_y->dim() != 3) {
    return py::none();
  }
  const int64_t d = num_heads * head_dim;
  const int64_t steps = given_y->size(0), batch = given_y->size(1), width = given_y->size(2);
  if (steps < 1 || steps > kMostStreamSteps || batch < 1 || batch > cpu::kRowsGemmMaxRows || width < 1 ||
      plain_float_cpu(y_object, {steps, batch, width}) == nullptr) {
    return py::none();
  }
  // The weights, read in place, row by row: each row contiguous (a copy otherwise).
  std::array<Tensor, 4> weights;
  const std::array<py::handle, 4> weight_objects{query_weight, key_weight, value_weight, out_weight};
  for (size_t i = 0; i < weights.size(); ++i) {
    const Tensor* w = i < 3 ? plain_float_cpu(weight_objects[i], {d, width})
                            : plain_float_cpu(weight_objects[i], {width, d});
    if (w == nullptr) return py::none();
    weights[i] = w->stride(1) == 1 ? *w : w->contiguous();
  }
  std::array<Tensor, 4> biases;  // undefined for None
  const std::array<py::handle, 4> bias_objects{query_bias, key_bias, value_bias, out_bias};
  for (size_t i = 0; i < biases.size(); ++i) {
    if (bias_objects[i].is_none()) continue;
    const Tensor* b = plain_float_cpu(bias_objects[i], {i < 3 ? d : width});
    if (b == nullptr) return py::none();
    biases[i] = b->contiguous();
  }
  const Tensor* past_keys = nullptr;
  const Tensor* past_values = nullptr;
  if (past_keys_object.is_none() != past_values_object.is_none()) return py::none();
  if (!past_keys_object.is_none()) {
    const Tensor* given = plain_tensor(past_keys_object);
    if (given == nullptr) return py::none();
    const int64_t past = given->dim() == 4 ? given->size(2) : 0;
    past_keys = plain_float_cpu(past_keys_object, {batch, num_heads, past, head_dim});
    past_values = plain_float_cpu(past_values_object, {batch, num_heads, past, head_dim});
    if (past_keys == nullptr || past_values == nullptr) return py::none();
  }
  if (at::GradMode::is_enabled()) {
    bool needed = given_y->requires_grad();
    for (const auto& t : weights) needed = needed || t.requires_grad();
    for (const auto& t : biases) needed = needed || (t.defined() && t.requires_grad());
    if (past_keys) needed = needed || past_keys->requires_grad() || past_values->requires_grad();
    if (needed) return py::none();
  }
  const Tensor y = given_y->contiguous();

  // One cache for keys then values, (2, B, capacity, D): the past positions the first step attends
  // (the last window - 1 of them), then the chunk's own.
  const int64_t past = past_keys ? past_keys->size(2) : 0;
  const int64_t attended = window ? std::min(past, *window - 1) : past;
  const int64_t capacity = attended + steps;
  const Tensor cache = at::empty({2, batch, capacity, d}, y.options());
  float* keys = cache.mutable_data_ptr<float>();
  float* values = keys + batch * capacity * d;
  if (attended > 0) {
    copy_positions(*past_keys, past - attended, attended, keys, capacity);
    copy_positions(*past_values, past - attended, attended, values, capacity);
  }

  std::vector<const float*> rows(3 * d + width);  // W_q, W_k, W_v stacked, then W_o
  for (size_t i = 0; i < weights.size(); ++i) {
    const float* data = weights[i].const_data_ptr<float>();
    const int64_t first = static_cast<int64_t>(i) * d, count = weights[i].size(0), stride = weights[i].stride(0);
    for (int64_t r = 0; r < count; ++r) rows[first + r] = data + r * stride;
  }
  std::vector<float> qkv_bias;  // gathered: the step adds one (3D,) bias (zeros for a None part)
  if (biases[0].defined() || biases[1].defined() || biases[2].defined()) {
    qkv_bias.assign(3 * d, 0.f);
    for (size_t i = 0; i < 3; ++i) {
      if (biases[i].defined()) std::copy_n(biases[i].const_data_ptr<float>(), d, qkv_bias.begin() + i * d);
    }
  }
  OneQueryWeights step_weights;
  step_weights.qkv.rows = rows.data();
  step_weights.qkv.n = 3 * d;
  step_weights.qkv.k = width;
  step_weights.out.rows = rows.data() + 3 * d;
  step_weights.out.n = width;
  step_weights.out.k = d;
  step_weights.qkv_bias = qkv_bias.empty() ? nullptr : qkv_bias.data();
  step_weights.out_bias = biases[3].defined() ? biases[3].const_data_ptr<float>() : nullptr;
  step_weights.width = width;
  step_weights.heads = num_heads;
  step_weights.head_dim = head_dim;

  Tensor out = at::empty({steps, batch, width}, y.options());
  {
    const py::gil_scoped_release no_gil;
    std::vector<float> workspace;
    const int64_t threads = cpu_threads_for(4 * width * d, batch, /*steps=*/1, LoopPass::forward);
    for (int64_t t = 0; t < steps; ++t) {
      // Step t's own position is attended + t; it attends the window - 1 before it (all with no window).
      const int64_t own = attended + t, first = window ? std::max<int64_t>(0, own - (*window - 1)) : 0;
      one_query_attention_step(step_weights, y.const_data_ptr<float>() + t * batch * width, batch, keys, values,
                               capacity, first, own - first, out.mutable_data_ptr<float>() + t * batch * width,
                               threads, workspace);
    }
  }
  // The state keeps the last window - 1 positions, this one included (every one with no window):
  // strided views (one op each; narrowing, splitting the heads and transposing cost ~13 µs).
  const int64_t kept = window ? std::min(capacity, *window - 1) : capacity;
  auto state_view = [&](int64_t which) -> py::object {
    if (kept == 0) return py::none();
    const int64_t offset = cache.storage_offset() + (which * batch * capacity + capacity - kept) * d;
    return wrap(cache.as_strided({batch, num_heads, kept, head_dim}, {capacity * d, head_dim, d, 1}, offset));
  };
  return py::make_tuple(wrap(std::move(out)), state_view(0), state_view(1));
}

}  // namespace

void define_hybrid_attention(py::module_& module) {
  py::class_<HybridAttentionStep>(module, "HybridAttentionStep",
                                  "HybridStreamer's attention step for a float32 block on the CPU, from a copy of "
                                  "its weights")
      .def(py::init<py::handle, py::handle, py::handle, py::handle, int64_t, int64_t>(), py::arg("qkv_weight"),
           py::arg("qkv_bias"), py::arg("out_weight"), py::arg("out_bias"), py::arg("num_heads"),
           py::arg("head_dim"),
           "qkv_weight (3D, W): the query, key and value weights stacked, qkv_bias (3D,) or None; out_weight "
           "(W, D), out_bias (W,) or None; D = num_heads * head_dim")
      .def("step", &HybridAttentionStep::step, py::arg("y"), py::arg("keys"), py::arg("values"), py::arg("first"),
           py::arg("count"),
           "y (B, W): the recurrent output of this position -> the block's output (B, W). keys and values "
           "(B, capacity, D), contiguous: the past positions at [first, first + count), this position's key "
           "and value written at first + count");
  module.def("hybrid_stream_attention", &hybrid_stream_attention, py::arg("y"), py::arg("query_weight"),
             py::arg("query_bias"), py::arg("key_weight"), py::arg("key_bias"), py::arg("value_weight"),
             py::arg("value_bias"), py::arg("out_weight"), py::arg("out_bias"), py::arg("num_heads"),
             py::arg("head_dim"), py::arg("window"), py::arg("past_keys"), py::arg("past_values"),
             "HybridBlock.stream's attention for a chunk of a few steps at a few batch rows, float32 on the CPU "
             "without autograd: y (T, B, W) -> (output (T, B, W), keys, values) of the state after it, or None "
             "where it does not apply");
}

}  // namespace rnnattn
