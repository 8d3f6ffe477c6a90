// CUDA passes of the LSTM projection: one thread per (row, column) of a (B, P) plane.
#include <cuda_runtime.h>

#include <algorithm>

#include "engine/cuda/half_io.cuh"
#include "engine/cuda/projection_cuda.h"

namespace rnnattn::cuda {
namespace {

constexpr int kThreads = 256;

template <class Args>
__global__ void projection_kernel(const Args args) {
  const int64_t cols = args.col_end - args.col_begin, count = args.batch * cols;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < count; e += int64_t(gridDim.x) * blockDim.x) {
    projection_element(args, e / cols, args.col_begin + e % cols);
  }
}

}  // namespace

template <class Args>
cudaError_t launch_projection_pass(const Args& args, cudaStream_t stream) {
  const int64_t count = args.batch * (args.col_end - args.col_begin);
  if (count == 0) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>((count + kThreads - 1) / kThreads, 65535);
  projection_kernel<<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

#define RNNATTN_INSTANTIATE_PROJECTION(T)                                                                   \
  template cudaError_t launch_projection_pass<ProjectionHoldArgs<T>>(const ProjectionHoldArgs<T>&, cudaStream_t); \
  template cudaError_t launch_projection_pass<ProjectionCarryArgs<T>>(const ProjectionCarryArgs<T>&, cudaStream_t);
RNNATTN_INSTANTIATE_PROJECTION(float)
RNNATTN_INSTANTIATE_PROJECTION(double)
RNNATTN_INSTANTIATE_PROJECTION(f16_t)
RNNATTN_INSTANTIATE_PROJECTION(bf16_t)
#undef RNNATTN_INSTANTIATE_PROJECTION

}  // namespace rnnattn::cuda
