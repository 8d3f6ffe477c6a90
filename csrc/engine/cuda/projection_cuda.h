// Launchers of the LSTM projection's per-row passes on CUDA (csrc/engine/projection_step.h).
// Torch-free, like the pointwise launchers; T is float, double, f16_t or bf16_t; errors are
// returned, not thrown.
#pragma once
#include <cuda_runtime_api.h>

#include "engine/projection_step.h"

namespace rnnattn::cuda {

template <typename T>
cudaError_t launch_hold_projected(const ProjectionHoldArgs<T>& args, cudaStream_t stream);

template <typename T>
cudaError_t launch_carry_projected_grad(const ProjectionCarryArgs<T>& args, cudaStream_t stream);

}  // namespace rnnattn::cuda
