#include "carried_slots.h"

#include <ATen/autocast_mode.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>

#include <algorithm>

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
  // row depend on how many rows the product has).
  std::pair<Tensor, Tensor> direct_slots() const {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    const Tensor rows = states().flatten(0, 1);
    auto slots = [&](const Tensor& weight, const std::optional<Tensor>& bias, const std::optional<Tensor>& past) {
      const int64_t batch = h0.size(0), width = weight.size(0);
      Tensor result = at::empty({kept + fresh, batch, width}, output.options());
      if (kept > 0) result.narrow(0, 0, kept).copy_(past->narrow(0, past->size(0) - kept, kept));
      linear_into(rows, weight, bias, result.narrow(0, kept, fresh).view({fresh * batch, width}));
      return result;
    };
    return {slots(w_k, b_k, past_keys), slots(w_v, b_v, past_values)};
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
