// Autocast (torch.autocast) rules for the forward ops, so that the modules work inside mixed-precision
// training code as torch.nn's do.
//
// CUDA: the floating-point tensor arguments are cast to the region's autocast dtype (float16 or
// bfloat16), as torch.nn runs cuDNN's RNNs under autocast; the kernels then compute in that dtype
// with float32 accumulation. CPU: our CPU kernels are float32/float64 only, so reduced-precision
// arguments (such as the output of a Linear under CPU autocast) are cast up to float32. float64 is
// never cast (autocast leaves it alone). Weights are cast through autocast's cache, once per region.
//
// The backward ops need no rule: autograd hands them the tensors the forward saved, already cast,
// and casts their gradients back to each parameter's own dtype.
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <string>

#include "ops/op_names.h"

namespace rnnattn {
namespace {

template <c10::DeviceType kDevice>
void autocast_forward(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const at::ScalarType compute =
      kDevice == c10::DeviceType::CUDA ? at::autocast::get_autocast_dtype(kDevice) : at::kFloat;
  const size_t arguments = op.schema().arguments().size();
  for (auto value = stack->end() - static_cast<std::ptrdiff_t>(arguments); value != stack->end(); ++value) {
    if (value->isTensor()) *value = at::autocast::cached_cast(compute, value->toTensor(), kDevice);
  }
  const c10::DispatchKey autocast_key = at::autocast::get_autocast_dispatch_key_from_device_type(kDevice);
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key);
  op.redispatchBoxed(keys & c10::DispatchKeySet(c10::DispatchKeySet::FULL_AFTER, autocast_key), stack);
}

template <c10::DeviceType kDevice>
void register_autocast(torch::Library& m) {
  for (const std::string& name : forward_op_names()) {
    m.impl(name.c_str(), torch::CppFunction::makeFromBoxedFunction<&autocast_forward<kDevice>>());
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(rnnattn, AutocastCPU, m) { register_autocast<c10::DeviceType::CPU>(m); }
TORCH_LIBRARY_IMPL(rnnattn, AutocastCUDA, m) { register_autocast<c10::DeviceType::CUDA>(m); }

}  // namespace rnnattn
