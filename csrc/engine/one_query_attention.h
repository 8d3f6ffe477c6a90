// One position's step of the hybrid block's attention (SPEC "Hybrid block") in float on the CPU,
// for HybridStreamer (python/rnnattn_ext/hybrid.py): for each batch row,
//   out = y + W_o · MHA(q = W_q y, keys [K_past; W_k y], values [V_past; W_v y]) (+ biases),
// the position's own key and value written into the caller's cache after the past ones. Written as
// torch operations, this step spent ~200 µs in a dozen small ops for 1 MiB of weights and a few
// thousand products per head on a 2-core x86; here it is two packed products and the attention
// cell's own attention pass (engine/attention_step.h), with a spin barrier between the phases.
// Free of torch.
#pragma once
#include <cstdint>
#include <vector>

#include "engine/cpu/packed_gemm.h"

namespace rnnattn {

class OneQueryAttention {
 public:
  // qkv_weight (3D, W): W_q, W_k, W_v stacked; out_weight (W, D); biases (3D,) and (W,) or null;
  // D = heads * head_dim. The weights are packed here (copies: the caller's may go).
  OneQueryAttention(const float* qkv_weight, const float* qkv_bias, const float* out_weight,
                    const float* out_bias, int64_t width, int64_t heads, int64_t head_dim);
  // Movable (the packed matrices point into storage that moves with them), not copyable.
  OneQueryAttention(OneQueryAttention&&) = default;
  OneQueryAttention(const OneQueryAttention&) = delete;
  OneQueryAttention& operator=(const OneQueryAttention&) = delete;

  // The cache of row b: position s's key at keys + (b * capacity + s) * D (values likewise); the
  // step attends the past positions [first, first + count) and its own, which it writes at
  // first + count (< capacity). y and out: (batch, W), contiguous. threads >= 1: how many CPU threads
  // may run it (one is used for a layer too small to pay for a barrier).
  void step(const float* y, int64_t batch, float* keys, float* values, int64_t capacity, int64_t first,
            int64_t count, float* out, int64_t threads);

  int64_t width() const { return width_; }
  int64_t heads() const { return heads_; }
  int64_t head_dim() const { return head_dim_; }
  int64_t attention_width() const { return heads_ * head_dim_; }

 private:
  int64_t width_, heads_, head_dim_;
  std::vector<float> qkv_storage_, out_storage_, qkv_bias_, out_bias_;
  cpu::PackedMatrix qkv_, out_;
  std::vector<float> workspace_;  // the step's product, query, context and softmax scratch
};

}  // namespace rnnattn
