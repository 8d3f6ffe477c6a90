// Launchers of the attention stage on CUDA (csrc/engine/attention_step.h). Torch-free, like the
// pointwise launchers; T is float, double, f16_t or bf16_t; errors are returned, not thrown.
#pragma once
#include <cuda_runtime_api.h>

#include "engine/attention_step.h"

namespace rnnattn::cuda {

template <typename T>
cudaError_t launch_attention_forward(const AttentionStepArgs<T>& args, cudaStream_t stream);

template <typename T>
cudaError_t launch_attention_backward(const AttentionStepArgs<T>& args, cudaStream_t stream);

}  // namespace rnnattn::cuda
