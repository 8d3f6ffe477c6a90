// CUDA passes of the LSTM projection: one thread per (row, column) of a (B, P) plane.
#include <cuda_runtime.h>

#include <algorithm>

#include "engine/cuda/half_io.cuh"
#include "engine/cuda/projection_cuda.h"

namespace rnnattn::cuda {
namespace {

constexpr int kThreads = 256;

template <class Args, class Body>
__global__ void plane_kernel(const Args args, Body body) {
  const int64_t cols = args.col_end - args.col_begin, count = args.batch * cols;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < count; e += int64_t(gridDim.x) * blockDim.x) {
    body(args, e / cols, args.col_begin + e % cols);
  }
}

template <class Args, class Body>
cudaError_t launch_plane(const Args& args, Body body, cudaStream_t stream) {
  const int64_t count = args.batch * (args.col_end - args.col_begin);
  if (count == 0) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>((count + kThreads - 1) / kThreads, 65535);
  plane_kernel<<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(args, body);
  return cudaGetLastError();
}

template <typename T>
struct Hold {
  __device__ void operator()(const ProjectionHoldArgs<T>& a, int64_t b, int64_t p) const { hold_projected(a, b, p); }
};

template <typename T>
struct Carry {
  __device__ void operator()(const ProjectionCarryArgs<T>& a, int64_t b, int64_t p) const {
    carry_projected_grad(a, b, p);
  }
};

}  // namespace

template <typename T>
cudaError_t launch_hold_projected(const ProjectionHoldArgs<T>& args, cudaStream_t stream) {
  return launch_plane(args, Hold<T>{}, stream);
}

template <typename T>
cudaError_t launch_carry_projected_grad(const ProjectionCarryArgs<T>& args, cudaStream_t stream) {
  return launch_plane(args, Carry<T>{}, stream);
}

#define RNNATTN_INSTANTIATE_PROJECTION(T)                                                             \
  template cudaError_t launch_hold_projected<T>(const ProjectionHoldArgs<T>&, cudaStream_t);         \
  template cudaError_t launch_carry_projected_grad<T>(const ProjectionCarryArgs<T>&, cudaStream_t);
RNNATTN_INSTANTIATE_PROJECTION(float)
RNNATTN_INSTANTIATE_PROJECTION(double)
RNNATTN_INSTANTIATE_PROJECTION(f16_t)
RNNATTN_INSTANTIATE_PROJECTION(bf16_t)
#undef RNNATTN_INSTANTIATE_PROJECTION

}  // namespace rnnattn::cuda
