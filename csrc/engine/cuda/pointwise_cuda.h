// Launchers of the CUDA pointwise passes. Torch-free: the .cu that defines them compiles in seconds.
// T is float, double, f16_t or bf16_t; work is queued on `stream`, errors are returned, not thrown.
#pragma once
#include <cuda_runtime_api.h>

#include "engine/step_args.h"

namespace rnnattn::cuda {

template <class Cell, typename T>
cudaError_t launch_forward_step(const ForwardStepArgs<T>& args, cudaStream_t stream);

template <class Cell, typename T>
cudaError_t launch_backward_step(const BackwardStepArgs<T>& args, cudaStream_t stream);

}  // namespace rnnattn::cuda
