// Launchers of the LSTM projection's per-row passes on CUDA (csrc/engine/projection_step.h).
// Torch-free, like the pointwise launchers; T is float, double, f16_t or bf16_t; errors are
// returned, not thrown.
#pragma once
#include <cuda_runtime_api.h>

#include "engine/projection_step.h"

namespace rnnattn::cuda {

// Either pass over its columns of every row (Args: ProjectionHoldArgs<T> or ProjectionCarryArgs<T>).
template <class Args>
cudaError_t launch_projection_pass(const Args& args, cudaStream_t stream);

}  // namespace rnnattn::cuda
