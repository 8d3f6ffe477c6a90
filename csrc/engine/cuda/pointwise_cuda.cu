// CUDA pointwise passes: one thread per unit (b, j), the cell math from csrc/cells.
#include <cuda_runtime.h>

#include <algorithm>

#include "cells/all_cells.h"
#include "engine/cuda/half_io.cuh"
#include "engine/cuda/pointwise_cuda.h"

namespace rnnattn {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// One thread per (row, unit) of the block, grid-stride.
template <class Cell, typename T, bool kSave, StepExtra kExtra>
__global__ void forward_step_kernel(const ForwardStepArgs<T> args) {
  const int64_t width = args.unit_end - args.unit_begin, units = args.batch * width;
  for (int64_t u = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; u < units;
       u += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = u / width, j = args.unit_begin + u % width;
    if (row_active(args, b)) {
      forward_unit<Cell, T, kSave, kExtra>(args, b, j);
    } else {
      hold_forward_unit<Cell, T>(args, b, j);
    }
  }
}

template <class Cell, typename T, bool kHiddenCopy>
__global__ void backward_step_kernel(const BackwardStepArgs<T> args) {
  const int64_t width = args.unit_end - args.unit_begin, units = args.batch * width;
  for (int64_t u = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; u < units;
       u += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = u / width, j = args.unit_begin + u % width;
    if (row_active(args, b)) {
      backward_unit<Cell, T, kHiddenCopy>(args, b, j);
    } else {
      hold_backward_unit<Cell, T, kHiddenCopy>(args, b, j);
    }
  }
}

unsigned int blocks_for(int64_t units) {
  const int64_t blocks = (units + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(std::min<int64_t>(std::max<int64_t>(blocks, 1), 65535));
}

template <class Cell, typename T, bool kSave>
void launch_forward_saving(const ForwardStepArgs<T>& args, unsigned int grid, cudaStream_t stream) {
  dispatch_step_extra(args, [&](auto extra) {
    forward_step_kernel<Cell, T, kSave, decltype(extra)::value><<<grid, kThreads, 0, stream>>>(args);
  });
}

}  // namespace

template <class Cell, typename T>
cudaError_t launch_forward_step(const ForwardStepArgs<T>& args, cudaStream_t stream) {
  const int64_t units = args.batch * (args.unit_end - args.unit_begin);
  if (units == 0) return cudaSuccess;
  const unsigned int grid = blocks_for(units);
  if (args.saved != nullptr) {
    launch_forward_saving<Cell, T, true>(args, grid, stream);
  } else {
    launch_forward_saving<Cell, T, false>(args, grid, stream);
  }
  return cudaGetLastError();
}

template <class Cell, typename T>
cudaError_t launch_backward_step(const BackwardStepArgs<T>& args, cudaStream_t stream) {
  const int64_t units = args.batch * (args.unit_end - args.unit_begin);
  if (units == 0) return cudaSuccess;
  if (!Cell::kSeparateHiddenGrad && args.dhg.ptr != nullptr) {
    backward_step_kernel<Cell, T, true><<<blocks_for(units), kThreads, 0, stream>>>(args);
  } else {
    backward_step_kernel<Cell, T, false><<<blocks_for(units), kThreads, 0, stream>>>(args);
  }
  return cudaGetLastError();
}

#define RNNATTN_INSTANTIATE_CUDA_TYPE(CELL, T)                                                   \
  template cudaError_t launch_forward_step<CELL, T>(const ForwardStepArgs<T>&, cudaStream_t);   \
  template cudaError_t launch_backward_step<CELL, T>(const BackwardStepArgs<T>&, cudaStream_t);
#define RNNATTN_INSTANTIATE_CUDA(CELL)          \
  RNNATTN_INSTANTIATE_CUDA_TYPE(CELL, float)    \
  RNNATTN_INSTANTIATE_CUDA_TYPE(CELL, double)   \
  RNNATTN_INSTANTIATE_CUDA_TYPE(CELL, f16_t)    \
  RNNATTN_INSTANTIATE_CUDA_TYPE(CELL, bf16_t)
RNNATTN_FOR_EACH_CELL(RNNATTN_INSTANTIATE_CUDA)

}  // namespace cuda
}  // namespace rnnattn
