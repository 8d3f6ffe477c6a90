// CUDA attention stage: one thread per (batch row, head), the math of csrc/engine/attention_step.h.
// A row-head pair owns its context columns and its columns of the key and value gradients, so the
// passes need no atomics (SPEC: deterministic).
#include <cuda_runtime.h>

#include <algorithm>

#include "engine/cuda/attention_cuda.h"
#include "engine/cuda/half_io.cuh"

namespace rnnattn::cuda {
namespace {

constexpr int kThreads = 128;

template <typename T, bool kBackward>
__global__ void attention_kernel(const AttentionStepArgs<T> args) {
  const int64_t heads = args.head_end - args.head_begin, pairs = args.batch * heads;
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < pairs; p += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = p / heads, h = args.head_begin + p % heads;
    if constexpr (kBackward) {
      attend_backward(args, b, h);
    } else {
      attend_forward(args, b, h);
    }
  }
}

template <typename T, bool kBackward>
cudaError_t launch(const AttentionStepArgs<T>& args, cudaStream_t stream) {
  const int64_t pairs = args.batch * (args.head_end - args.head_begin);
  if (pairs == 0) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>((pairs + kThreads - 1) / kThreads, 65535);
  attention_kernel<T, kBackward><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace

template <typename T>
cudaError_t launch_attention_forward(const AttentionStepArgs<T>& args, cudaStream_t stream) {
  return launch<T, false>(args, stream);
}

template <typename T>
cudaError_t launch_attention_backward(const AttentionStepArgs<T>& args, cudaStream_t stream) {
  return launch<T, true>(args, stream);
}

#define RNNATTN_INSTANTIATE_ATTENTION(T)                                                            \
  template cudaError_t launch_attention_forward<T>(const AttentionStepArgs<T>&, cudaStream_t);    \
  template cudaError_t launch_attention_backward<T>(const AttentionStepArgs<T>&, cudaStream_t);
RNNATTN_INSTANTIATE_ATTENTION(float)
RNNATTN_INSTANTIATE_ATTENTION(double)
RNNATTN_INSTANTIATE_ATTENTION(f16_t)
RNNATTN_INSTANTIATE_ATTENTION(bf16_t)
#undef RNNATTN_INSTANTIATE_ATTENTION

}  // namespace rnnattn::cuda
