// The persistent forward and backward loops on CUDA: one cooperative launch, a grid-wide barrier per
// step; each thread block's work between barriers is engine/persistent_forward.h, persistent_backward.h.
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

template <class Cell, typename T>
__global__ void __launch_bounds__(kThreads) persistent_backward_kernel(const PersistentBackwardArgs<T> args) {
  extern __shared__ __align__(16) unsigned char shared[];
  const PersistentBackwardBlock<Cell, T> block(args, blockIdx.x, shared);
  const int64_t thread = threadIdx.x, threads = blockDim.x, batch = args.step.batch, tile = args.batch_tile;
  cooperative_groups::grid_group grid = cooperative_groups::this_grid();
  block.load_weights(thread, threads);
  for (int64_t k = args.layout.steps - 1; k >= 0; --k) {
    block.pointwise(k, thread, threads);
    grid.sync();  // every block's gate gradients of step k written
    for (int64_t b0 = 0; b0 < batch; b0 += tile) {
      const int64_t n = min(tile, batch - b0);
      block.stage_rows(k, b0, n, thread, threads);
      __syncthreads();  // the tile (and, first time round, the weights) staged
      block.multiply_rows(n, thread, threads);
      __syncthreads();  // the partial sums complete, the tile free for the next
      block.accumulate_rows(b0, n, thread, threads);
    }
    __syncthreads();  // the carried gradient complete before other threads of the block read it
  }
}

// How a persistent loop shares the units out on the current device: one block per SM at most,
// each with an equal share. False where the device has no cooperative launch or there is no work.
struct UnitSplit {
  int sms = 0, shared_bytes = 0;  // the device's SMs and opt-in shared memory per block
  int64_t units = 0, blocks = 0;
};
bool split_units(int64_t batch, int64_t hidden, UnitSplit& split) {
  int device = 0, cooperative = 0;
  if (batch <= 0 || hidden <= 0) return false;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&split.sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&split.shared_bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device) != cudaSuccess) {
    cudaGetLastError();  // not sticky: leave no error behind for the loop step by step
    return false;
  }
  if (cooperative == 0 || split.sms <= 0) return false;
  split.units = (hidden + split.sms - 1) / split.sms;
  split.blocks = persistent_blocks(hidden, split.units);
  return true;
}

// Whether `blocks` blocks of `kernel` with `bytes` of shared memory each fit on the device at once
// (the grid-wide barrier needs every block resident). The kernel may then use up to the device's
// opt-in limit, not just `bytes`: the attribute is the process's, and another thread planning a
// smaller launch between this plan and its launch must not lower it under this one.
template <class Kernel>
bool all_resident(Kernel kernel, int64_t blocks, int64_t bytes, const UnitSplit& split) {
  int per_sm = 0;
  if (bytes > split.shared_bytes ||
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, split.shared_bytes) !=
          cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, static_cast<size_t>(bytes)) !=
          cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return int64_t(per_sm) * split.sms >= blocks;
}

// The batch tile: the whole batch where its rows fit in `free_bytes` (rows of row_bytes, a whole
// number of the products' row groups), else the most rows that do; 0 where not even one group fits.
int64_t batch_tile(int64_t batch, int64_t free_bytes, int64_t row_bytes) {
  const int64_t fitting = free_bytes / row_bytes / kPersistentRowsPerThread * kPersistentRowsPerThread;
  if (fitting < kPersistentRowsPerThread) return 0;
  return persistent_tile_rows(batch) <= fitting ? batch : fitting;
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
  const int64_t batch = args.step.batch, hidden = args.step.hidden;
  UnitSplit split;
  if (!split_units(batch, hidden, split)) return false;
  const int64_t fixed = persistent_shared_bytes<Cell, T>(batch, hidden, split.units, 0);
  const int64_t tile = batch_tile(batch, split.shared_bytes - fixed, persistent_padded_width(hidden) * int64_t(sizeof(A)));
  if (tile == 0) return false;
  args.units = split.units;
  args.batch_tile = tile;
  const int64_t bytes = persistent_shared_bytes<Cell, T>(batch, hidden, split.units, tile);
  return with_kernel<Cell, T>(args, [&](auto kernel) { return all_resident(kernel, split.blocks, bytes, split); });
}

template <class Cell, typename T>
cudaError_t launch_persistent_forward(const PersistentForwardArgs<T>& args, cudaStream_t stream) {
  if (args.layout.steps == 0) return cudaSuccess;
  const int64_t blocks = persistent_blocks(args.step.hidden, args.units);
  const int64_t bytes = persistent_shared_bytes<Cell, T>(args.step.batch, args.step.hidden, args.units, args.batch_tile);
  PersistentForwardArgs<T> copy = args;
  void* parameters[] = {&copy};
  return with_kernel<Cell, T>(args, [&](auto kernel) {
    return cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), dim3(static_cast<unsigned int>(blocks)),
                                       dim3(kThreads), parameters, static_cast<size_t>(bytes), stream);
  });
}

template <class Cell, typename T>
bool plan_persistent_backward(PersistentBackwardArgs<T>& args) {
  using A = typename ScalarIO<T>::Acc;
  const int64_t batch = args.step.batch, hidden = args.step.hidden;
  UnitSplit split;
  if (!split_units(batch, hidden, split)) return false;
  const int64_t units = split.units;
  const int64_t width = persistent_padded_width(Cell::kGates * hidden);
  // The partial sums take at most kThreads * kPersistentRowsPerThread values (parts below).
  const int64_t fixed = (units * width + kThreads * kPersistentRowsPerThread) * int64_t(sizeof(A));
  const int64_t tile = batch_tile(batch, split.shared_bytes - fixed, width * int64_t(sizeof(A)));
  if (tile == 0) return false;
  // Enough parts of each sum for every thread to have one, each at least 16 quads long.
  const int64_t groups = (tile + kPersistentRowsPerThread - 1) / kPersistentRowsPerThread;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(kThreads / (units * groups), width / 4 / 16));
  args.units = units;
  args.batch_tile = tile;
  args.parts = parts;
  const int64_t bytes = persistent_backward_shared_bytes<Cell, T>(hidden, units, tile, parts);
  return all_resident(persistent_backward_kernel<Cell, T>, split.blocks, bytes, split);
}

template <class Cell, typename T>
cudaError_t launch_persistent_backward(const PersistentBackwardArgs<T>& args, cudaStream_t stream) {
  if (args.layout.steps == 0) return cudaSuccess;
  const int64_t blocks = persistent_blocks(args.step.hidden, args.units);
  const int64_t bytes = persistent_backward_shared_bytes<Cell, T>(args.step.hidden, args.units, args.batch_tile, args.parts);
  PersistentBackwardArgs<T> copy = args;
  void* parameters[] = {&copy};
  return cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(persistent_backward_kernel<Cell, T>),
                                     dim3(static_cast<unsigned int>(blocks)), dim3(kThreads), parameters,
                                     static_cast<size_t>(bytes), stream);
}

#define RNNATTN_INSTANTIATE_PERSISTENT_TYPE(CELL, T)                                                        \
  template bool plan_persistent_forward<CELL, T>(PersistentForwardArgs<T>&);                                \
  template cudaError_t launch_persistent_forward<CELL, T>(const PersistentForwardArgs<T>&, cudaStream_t);   \
  template bool plan_persistent_backward<CELL, T>(PersistentBackwardArgs<T>&);                              \
  template cudaError_t launch_persistent_backward<CELL, T>(const PersistentBackwardArgs<T>&, cudaStream_t);
#define RNNATTN_INSTANTIATE_PERSISTENT(CELL)          \
  RNNATTN_INSTANTIATE_PERSISTENT_TYPE(CELL, float)    \
  RNNATTN_INSTANTIATE_PERSISTENT_TYPE(CELL, double)   \
  RNNATTN_INSTANTIATE_PERSISTENT_TYPE(CELL, f16_t)    \
  RNNATTN_INSTANTIATE_PERSISTENT_TYPE(CELL, bf16_t)
RNNATTN_FOR_EACH_CELL(RNNATTN_INSTANTIATE_PERSISTENT)

}  // namespace rnnattn::cuda
