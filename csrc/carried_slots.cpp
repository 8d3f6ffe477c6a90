#include "carried_slots.h"

#include <ATen/autocast_mode.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>

#include <algorithm>
#include <cstring>

#include "engine/recurrent_engine.h"

namespace rnnattn {
namespace {

using at::Tensor;

struct CarriedSlots {
  const Tensor& h0;      // (B, H)
  const Tensor& output;  // (T, B, H)
  const Tensor &w_k, &w_v;
  const std::optional<Tensor> &b_k, &b_v, &past_keys, &past_values;
  int64_t fresh = 0, kept = 0;  // the new slots carried; the past ones carried

  // Whether the slots may be written straight into their tensors, below autograd (a streaming
  // step's usual case, where the recorded form's six ATen calls cost a third of the step): nothing
  // they come from needs a gradient, every tensor is a CPU one of the output's dtype with rows of
  // unit stride, and no CPU autocast would change the product's dtype.
  bool direct() const {
    const bool recorded = at::GradMode::is_enabled();
    bool plain = !at::autocast::is_autocast_enabled(at::kCPU);
    auto fits = [&](const Tensor& t) {
      plain = plain && t.is_cpu() && t.scalar_type() == output.scalar_type() && t.stride(-1) == 1 &&
              !(recorded && t.requires_grad());
    };
    for (const Tensor* t : {&h0, &output, &w_k, &w_v}) fits(*t);
    for (const std::optional<Tensor>* t : {&b_k, &b_v, &past_keys, &past_values}) {
      if (*t) fits(**t);
    }
    return plain && output.is_contiguous();
  }

  // The new slots' states (fresh, B, H): the most recent of h_0 and the outputs but the last.
  Tensor states() const {
    const int64_t steps = output.size(0);
    if (fresh < steps) return output.narrow(0, steps - 1 - fresh, fresh);
    return steps == 1 ? h0.unsqueeze(0) : at::cat({h0.unsqueeze(0), output.narrow(0, 0, steps - 1)}, 0);
  }

  // Keys and values (kept + fresh, B, D) written straight into their tensors: the past ones kept,
  // then one product over every new slot's state, as the general path's (ATen's sums for a float64
  // row depend on how many rows the product has). Raw copies and operands instead of views: each
  // view or copy through ATen costs about a microsecond, and a streaming step made a dozen.
  std::pair<Tensor, Tensor> direct_slots() const {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    const int64_t steps = output.size(0), batch = h0.size(0), hidden = h0.size(1);
    // The new slots' states as rows of one tensor: the outputs before the last, h_0 alone (a
    // one-step call), or h_0 and every output but the last, joined.
    const Tensor joined = fresh < steps || steps == 1 ? Tensor() : states().contiguous();
    const int64_t first_output = (steps - 1 - fresh) * batch * hidden;
    const Operand rows = fresh < steps ? Operand{output, first_output, fresh * batch, hidden, hidden}
                         : steps == 1  ? Operand{h0, 0, batch, hidden, h0.stride(0)}
                                       : Operand{joined, 0, fresh * batch, hidden, hidden};
    auto slots = [&](const Tensor& weight, const std::optional<Tensor>& bias, const std::optional<Tensor>& past) {
      const int64_t width = weight.size(0);
      Tensor result = at::empty({kept + fresh, batch, width}, output.options());
      if (kept > 0) copy_recent(*past, result);
      linear_into(rows, weight, bias, Operand{result, kept * batch * width, fresh * batch, width, width});
      return result;
    };
    return {slots(w_k, b_k, past_keys), slots(w_v, b_v, past_values)};
  }

  // The `kept` most recent of the past slots (P, B, D) into the first `kept` of `result`
  // (contiguous), a memcpy per slot and row (the past's rows have unit stride: direct()).
  void copy_recent(const Tensor& past, const Tensor& result) const {
    const int64_t first = past.size(0) - kept, batch = past.size(1), width = past.size(2);
    const int64_t element = past.element_size(), bytes = width * element;
    const int64_t slot_stride = past.stride(0) * element, row_stride = past.stride(1) * element;
    const char* source = static_cast<const char*>(past.const_data_ptr());
    char* target = static_cast<char*>(result.data_ptr());
    for (int64_t j = 0; j < kept; ++j) {
      for (int64_t b = 0; b < batch; ++b) {
        std::memcpy(target + (j * batch + b) * bytes, source + (first + j) * slot_stride + b * row_stride, bytes);
      }
    }
  }

  // As functional.carried_slots, recorded by autograd (the same graph: the states taken once).
  std::pair<Tensor, Tensor> recorded_slots() const {
    const Tensor rows = states();
    Tensor keys = at::linear(rows, w_k, b_k), values = at::linear(rows, w_v, b_v);
    if (kept > 0) {
      keys = at::cat({past_keys->narrow(0, past_keys->size(0) - kept, kept), keys}, 0);
      values = at::cat({past_values->narrow(0, past_values->size(0) - kept, kept), values}, 0);
    }
    return {keys, values};
  }
};

}  // namespace

std::pair<Tensor, Tensor> carried_slots(const Tensor& h0, const Tensor& output, const Tensor& w_k,
                                        const std::optional<Tensor>& b_k, const Tensor& w_v,
                                        const std::optional<Tensor>& b_v, const std::optional<Tensor>& past_keys,
                                        const std::optional<Tensor>& past_values, std::optional<int64_t> wanted) {
  if (wanted == 0) return {};
  CarriedSlots carried{h0, output, w_k, w_v, b_k, b_v, past_keys, past_values};
  const int64_t steps = output.size(0), past = past_keys ? past_keys->size(0) : 0;
  carried.fresh = wanted ? std::min(steps, *wanted) : steps;
  carried.kept = wanted ? std::min(past, *wanted - carried.fresh) : past;
  return carried.direct() ? carried.direct_slots() : carried.recorded_slots();
}

}  // namespace rnnattn
