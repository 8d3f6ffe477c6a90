// CUDA attention stage: one warp per (batch row, head), the math of csrc/engine/attention_step.h
// spread over the warp's lanes: the slots' scores and their softmax over the lanes (warp-shuffle
// max and sum), the weighted sums over slots by lane groups of the head's columns. One thread per
// pair, as on the CPU, would walk every slot alone: with B = 1 and 4 heads, four threads on the GPU.
// A pair owns its context columns, its columns of the key and value gradients and its staged rows,
// so the passes need no atomics, and the fixed shuffle order keeps them deterministic (SPEC).
#include <cuda_runtime.h>

#include <algorithm>

#include "engine/cuda/attention_cuda.h"
#include "engine/cuda/half_io.cuh"

namespace rnnattn::cuda {
namespace {

constexpr int kWarp = 32, kWarpsPerBlock = 4;
constexpr unsigned kAllLanes = 0xffffffffu;

template <typename A>
__device__ __forceinline__ A warp_max(A v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const A other = __shfl_xor_sync(kAllLanes, v, offset);
    v = other > v ? other : v;
  }
  return v;
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kAllLanes, v, offset);
  return v;
}

// Softmax weights of row b, head h over its slots [first, end) into p[s - first] (the pair's
// scratch), each lane its slots s = first + lane (mod 32); the warp agrees on max and sum.
template <typename T, typename A>
__device__ void softmax_weights(const AttentionStepArgs<T>& a, const T* q, int64_t b, int64_t h, int64_t first,
                                int64_t end, A* p, int lane) {
  const int64_t col = h * a.head_dim;
  const A scale = A(a.scale);
  A max_score = A(-INFINITY);
  for (int64_t s = first + lane; s < end; s += kWarp) {
    const A score = attention_detail::dot<T, A>(q, a.keys + s * a.slot_stride + b * a.row_stride + col, a.head_dim) *
                    scale;
    p[s - first] = score;
    max_score = score > max_score ? score : max_score;
  }
  max_score = warp_max(max_score);
  A denominator = A(0);
  for (int64_t i = lane; i < end - first; i += kWarp) {
    p[i] = attention_detail::exp_(p[i] - max_score);
    denominator += p[i];
  }
  const A inv = A(1) / warp_sum(denominator);
  for (int64_t i = lane; i < end - first; i += kWarp) p[i] *= inv;
  __syncwarp();  // every lane reads every slot's weight next
}

// out[d] = sum over slots s of coef[s - first] * rows[s][d] (rows: keys or values of row b at head
// column col). Lanes form groups of `width` columns; the groups split the slots and add up by
// shuffles, so a head of 16 columns still keeps all 32 lanes busy.
template <typename T, typename A>
__device__ void combine_slots(const AttentionStepArgs<T>& a, const T* rows, int64_t b, int64_t col, const A* coef,
                              int64_t first, int64_t end, T* out, int lane) {
  using IO = ScalarIO<T>;
  int width = kWarp;
  while (width / 2 >= a.head_dim && width > 1) width /= 2;
  const int groups = kWarp / width, group = lane / width;
  for (int64_t d0 = 0; d0 < a.head_dim; d0 += width) {
    const int64_t d = d0 + lane % width;
    A acc = A(0);
    if (d < a.head_dim) {
      for (int64_t s = first + group; s < end; s += groups) {
        acc += coef[s - first] * A(IO::load(rows[s * a.slot_stride + b * a.row_stride + col + d]));
      }
    }
    for (int offset = width; offset < kWarp; offset *= 2) acc += __shfl_xor_sync(kAllLanes, acc, offset);
    if (group == 0 && d < a.head_dim) out[d] = IO::store(acc);
  }
}

template <typename T>
__device__ void attend_forward_warp(const AttentionStepArgs<T>& a, int64_t b, int64_t h, int lane) {
  using IO = ScalarIO<T>;
  using A = typename IO::Acc;
  for (int64_t i = lane; i < staged_elements(a); i += kWarp) stage_element(a, b, h, i);
  __syncwarp();  // the query and the new slot are read by every lane
  const int64_t col = h * a.head_dim;
  const T* q = a.query + b * a.query_stride + col;
  int64_t first, end;
  attention_detail::slot_range(a, b, first, end);
  A* p = static_cast<A*>(a.scratch) + (b * a.heads + h) * 2 * a.scratch_slots;
  softmax_weights<T, A>(a, q, b, h, first, end, p, lane);
  combine_slots(a, a.values, b, col, p, first, end, a.context + b * a.context_stride + col, lane);
  if (a.weights != nullptr) {
    const int64_t offset = a.self_memory ? a.weight_slots - (end - first) : 0;
    T* w = a.weights + (b * a.heads + h) * a.weight_slots + offset;
    for (int64_t i = lane; i < end - first; i += kWarp) w[i] = IO::store(p[i]);
  }
}

// As attend_backward: dscore_s = p_s (g . v_s - g . ctx) * scale, grad_query = sum_s dscore_s k_s,
// grad_keys[s] += dscore_s q, grad_values[s] += p_s g; then the new slot's gradients go out.
template <typename T>
__device__ void attend_backward_warp(const AttentionStepArgs<T>& a, int64_t b, int64_t h, int lane) {
  using IO = ScalarIO<T>;
  using A = typename IO::Acc;
  const int64_t col = h * a.head_dim;
  const T* q = a.query + b * a.query_stride + col;
  const T* g = a.grad_context + b * a.grad_context_stride + col;
  int64_t first, end;
  attention_detail::slot_range(a, b, first, end);
  A* p = static_cast<A*>(a.scratch) + (b * a.heads + h) * 2 * a.scratch_slots;
  A* dscore = p + a.scratch_slots;
  softmax_weights<T, A>(a, q, b, h, first, end, p, lane);
  A g_dot_ctx = A(0);
  for (int64_t s = first + lane; s < end; s += kWarp) {
    const A dp = attention_detail::dot<T, A>(g, a.values + s * a.slot_stride + b * a.row_stride + col, a.head_dim);
    dscore[s - first] = dp;
    g_dot_ctx += p[s - first] * dp;
  }
  g_dot_ctx = warp_sum(g_dot_ctx);
  const A scale = A(a.scale);
  for (int64_t i = lane; i < end - first; i += kWarp) dscore[i] = p[i] * (dscore[i] - g_dot_ctx) * scale;
  __syncwarp();
  combine_slots(a, a.keys, b, col, dscore, first, end, a.grad_query + b * a.grad_query_stride + col, lane);
  for (int64_t i = lane; i < (end - first) * a.head_dim; i += kWarp) {
    const int64_t s = first + i / a.head_dim, d = i % a.head_dim;
    const int64_t at = grad_offset(a, b, h, s) + d;
    a.grad_keys[at] = IO::store(A(IO::load(a.grad_keys[at])) + dscore[s - first] * A(IO::load(q[d])));
    a.grad_values[at] = IO::store(A(IO::load(a.grad_values[at])) + p[s - first] * A(IO::load(g[d])));
  }
  __syncwarp();  // the new slot's gradients are complete
  for (int64_t i = lane; i < unstaged_elements(a); i += kWarp) unstage_element(a, b, h, i);
}

template <typename T, bool kBackward>
__global__ void attention_kernel(const AttentionStepArgs<T> args) {
  const int64_t heads = args.head_end - args.head_begin, pairs = args.batch * heads;
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / kWarp);
  // Whole warps take a pair at a time (the shuffles need every lane).
  for (int64_t p = blockIdx.x * int64_t(blockDim.x / kWarp) + threadIdx.x / kWarp; p < pairs; p += warps) {
    const int64_t b = p / heads, h = args.head_begin + p % heads;
    if constexpr (kBackward) {
      attend_backward_warp(args, b, h, lane);
    } else {
      attend_forward_warp(args, b, h, lane);
    }
  }
}

template <typename T, bool kBackward>
cudaError_t launch(const AttentionStepArgs<T>& args, cudaStream_t stream) {
  const int64_t pairs = args.batch * (args.head_end - args.head_begin);
  if (pairs == 0) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>((pairs + kWarpsPerBlock - 1) / kWarpsPerBlock, 65535);
  attention_kernel<T, kBackward><<<static_cast<unsigned int>(blocks), kWarpsPerBlock * kWarp, 0, stream>>>(args);
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
