// _C.HybridAttentionStep: the attention of HybridStreamer's step (python/rnnattn_ext/hybrid.py) for a
// float32 block on the CPU, through engine/one_query_attention.h. The streamer owns the cache of
// keys and values, (B, capacity, D) each, and tells each step where its positions lie; the step writes
// its own position's key and value there and returns the block's output. Inference only.
#include "python_hybrid_attention.h"

#include <ATen/ops/empty.h>

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
}

}  // namespace rnnattn
