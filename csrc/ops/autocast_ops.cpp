// Autocast (torch.autocast) rules for the forward ops, so that the modules work inside mixed-precision
// training code as torch.nn's do.
//
// The floating-point tensor arguments are cast to the region's autocast dtype (float16 or bfloat16),
// as torch.nn runs its RNNs under autocast (cuDNN; oneDNN's bfloat16 kernels on the CPU): on CUDA the
// kernels compute in that dtype with float32 accumulation; on the CPU the base layers' ops compute
// it in float32, their products in bfloat16 where the CPU has AVX512-BF16 (recurrent_engine.cpp).
// The attention ops take float32/float64 on the CPU: there their reduced-precision arguments (such
// as the output of a Linear under CPU autocast) are cast up to float32. float64 is never cast
// (autocast leaves it alone). Weights are cast through autocast's cache, once per region.
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

// kInFloat32: the op computes float32 on this device (the CPU attention ops), not the region's dtype.
template <c10::DeviceType kDevice, bool kInFloat32>
void autocast_forward(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const at::ScalarType compute = kInFloat32 ? at::kFloat : at::autocast::get_autocast_dtype(kDevice);
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
    const bool attention = name.find("_attn_") != std::string::npos;
    if (kDevice == c10::DeviceType::CPU && attention) {
      m.impl(name.c_str(), torch::CppFunction::makeFromBoxedFunction<&autocast_forward<kDevice, true>>());
    } else {
      m.impl(name.c_str(), torch::CppFunction::makeFromBoxedFunction<&autocast_forward<kDevice, false>>());
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(rnnattn, AutocastCPU, m) { register_autocast<c10::DeviceType::CPU>(m); }
TORCH_LIBRARY_IMPL(rnnattn, AutocastCUDA, m) { register_autocast<c10::DeviceType::CUDA>(m); }

}  // namespace rnnattn
