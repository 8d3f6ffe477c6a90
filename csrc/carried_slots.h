// A streaming call's self-memory slots for the next call (functional.carried_slots): the keys and
// values of the window - 1 most recent slots (all with no window), oldest first. Used by the modules'
// C++ call (python_layer_call.cpp) and by the streamer (python_streamer.cpp).
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <utility>

namespace rnnattn {

// The keys and values (P, B, D) the next call takes as past_keys/past_values. This call's slots were
// the past ones (past_keys/past_values, or none), then h0 (B, H) and the outputs (T, B, H) but the
// last; `wanted` the most slots carried (none: every one; 0: none, both results undefined). Only the
// new slots' keys and values are computed, once each. Records autograd history when a gradient may
// flow (grad mode and a tensor that requires grad), as functional.carried_slots does.
std::pair<at::Tensor, at::Tensor> carried_slots(const at::Tensor& h0, const at::Tensor& output, const at::Tensor& w_k,
                                                const std::optional<at::Tensor>& b_k, const at::Tensor& w_v,
                                                const std::optional<at::Tensor>& b_v,
                                                const std::optional<at::Tensor>& past_keys,
                                                const std::optional<at::Tensor>& past_values,
                                                std::optional<int64_t> wanted);

}  // namespace rnnattn
