// The persistent forward loop on CUDA: one cooperative launch, a grid-wide barrier per step; each
// thread block's work between barriers is engine/persistent_forward.h.
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "cells/all_cells.h"
#include "engine/cuda/half_io.cuh"
#include "engine/cuda/persistent_cuda.h"

namespace rnnattn::cuda {
namespace {

constexpr int kThreads = 256;

template <class Cell, typename T, bool kSave, StepExtra kExtra>
__global__ void __launch_bounds__(kThreads) persistent_forward_kernel(const PersistentForwardArgs<T> args) {
  extern __shared__ __align__(16) unsigned char shared[];
  const PersistentForwardBlock<Cell, T, kSave, kExtra> block(args, blockIdx.x, shared);
  const int64_t thread = threadIdx.x, threads = blockDim.x, batch = args.step.batch, tile = args.batch_tile;
  cooperative_groups::grid_group grid = cooperative_groups::this_grid();
  block.load_weights(thread, threads);
  for (int64_t k = 0; k < args.layout.steps; ++k) {
    const T* h_prev = args.layout.before(k, 0);
    for (int64_t b0 = 0; b0 < batch; b0 += tile) {
      const int64_t n = min(tile, batch - b0);
      block.stage_rows(h_prev, b0, n, thread, threads);
      __syncthreads();  // the tile (and, first time round, the weights) staged
      block.multiply_rows(b0, n, thread, threads);
      __syncthreads();  // the tile read: the next one may overwrite it
    }
    block.pointwise(k, thread, threads);
    grid.sync();  // h_t complete in every block before any reads it
  }
}

// The kernel for the pass's variant: training or inference, with or without the recurrent bias.
template <class Cell, typename T, class F>
auto with_kernel(const PersistentForwardArgs<T>& args, F&& f) {
  const bool bias = args.step.hbias.ptr != nullptr;
  if (args.layout.training) {
    return bias ? f(persistent_forward_kernel<Cell, T, true, StepExtra::hidden_bias>)
                : f(persistent_forward_kernel<Cell, T, true, StepExtra::none>);
  }
  return bias ? f(persistent_forward_kernel<Cell, T, false, StepExtra::hidden_bias>)
              : f(persistent_forward_kernel<Cell, T, false, StepExtra::none>);
}

}  // namespace

template <class Cell, typename T>
bool plan_persistent_forward(PersistentForwardArgs<T>& args) {
  using A = typename ScalarIO<T>::Acc;
  int device = 0, sms = 0, shared_limit = 0, cooperative = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&shared_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device) != cudaSuccess) {
    cudaGetLastError();  // not sticky: leave no error behind for the step-by-step loop
    return false;
  }
  const int64_t batch = args.step.batch, hidden = args.step.hidden;
  if (!cooperative || batch <= 0 || hidden <= 0 || sms <= 0) return false;
  // One block per SM at most, each with an equal share of the units.
  const int64_t units = (hidden + sms - 1) / sms, blocks = (hidden + units - 1) / units;
  // The largest batch tile (a whole number of the product's row groups) that fits beside the weights.
  const int64_t fixed = persistent_shared_bytes<Cell, T>(batch, hidden, units, 0);
  const int64_t row_bytes = persistent_padded_width(hidden) * int64_t(sizeof(A));
  const int64_t fitting = (shared_limit - fixed) / row_bytes / kPersistentRowsPerThread * kPersistentRowsPerThread;
  if (fitting < kPersistentRowsPerThread) return false;
  args.units = units;
  args.batch_tile = persistent_tile_rows(batch) <= fitting ? batch : fitting;
  const int64_t bytes = persistent_shared_bytes<Cell, T>(batch, hidden, units, args.batch_tile);
  // Every block must be resident at once for the grid-wide barrier.
  const bool resident = with_kernel<Cell, T>(args, [&](auto kernel) {
    int per_sm = 0;
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)) !=
            cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, static_cast<size_t>(bytes)) !=
            cudaSuccess) {
      cudaGetLastError();
      return false;
    }
    return int64_t(per_sm) * sms >= blocks;
  });
  return resident;
}

template <class Cell, typename T>
cudaError_t launch_persistent_forward(const PersistentForwardArgs<T>& args, cudaStream_t stream) {
  if (args.layout.steps == 0) return cudaSuccess;
  const int64_t blocks = (args.step.hidden + args.units - 1) / args.units;
  const int64_t bytes = persistent_shared_bytes<Cell, T>(args.step.batch, args.step.hidden, args.units, args.batch_tile);
  PersistentForwardArgs<T> copy = args;
  void* parameters[] = {&copy};
  return with_kernel<Cell, T>(args, [&](auto kernel) {
    return cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), dim3(static_cast<unsigned int>(blocks)),
                                       dim3(kThreads), parameters, static_cast<size_t>(bytes), stream);
  });
}

#define RNNATTN_INSTANTIATE_PERSISTENT_TYPE(CELL, T)                                 \
  template bool plan_persistent_forward<CELL, T>(PersistentForwardArgs<T>&);         \
  template cudaError_t launch_persistent_forward<CELL, T>(const PersistentForwardArgs<T>&, cudaStream_t);
#define RNNATTN_INSTANTIATE_PERSISTENT(CELL)          \
  RNNATTN_INSTANTIATE_PERSISTENT_TYPE(CELL, float)    \
  RNNATTN_INSTANTIATE_PERSISTENT_TYPE(CELL, double)   \
  RNNATTN_INSTANTIATE_PERSISTENT_TYPE(CELL, f16_t)    \
  RNNATTN_INSTANTIATE_PERSISTENT_TYPE(CELL, bf16_t)
RNNATTN_FOR_EACH_CELL(RNNATTN_INSTANTIATE_PERSISTENT)

}  // namespace rnnattn::cuda
