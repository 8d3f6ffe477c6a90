// One position's step of the hybrid block's attention (SPEC "Hybrid block") in float on the CPU,
// for HybridStreamer and HybridBlock.stream (python/rnnattn_ext/hybrid.py): for each batch row,
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

// A weight matrix M (n x k) of the step as its products read it: packed into panels (a copy made
// once, for many steps) or in place through a table of row addresses (a module's live weights for
// one step at a few rows, where packing would cost more than the product: cpu/packed_gemm.h).
struct OneQueryMatrix {
  cpu::PackedMatrix packed;            // used when packed.panels is set
  const float* const* rows = nullptr;  // else row i of M, contiguous, at rows[i]
  int64_t n = 0, k = 0;
};

// What one step reads: the query, key and value weights stacked, (3D, W), and W_o, (W, D); the
// biases (3D,) and (W,) or null. D = heads * head_dim.
struct OneQueryWeights {
  OneQueryMatrix qkv, out;
  const float* qkv_bias = nullptr;
  const float* out_bias = nullptr;
  int64_t width = 0, heads = 0, head_dim = 0;
};

// One position's step. The cache of row b: position s's key at keys + (b * capacity + s) * D
// (values likewise); the step attends the past positions [first, first + count) and its own, which
// it writes at first + count (< capacity). y and out: (batch, W), contiguous. threads >= 1: how
// many CPU threads may run it. `workspace` is resized to what the step needs.
void one_query_attention_step(const OneQueryWeights& weights, const float* y, int64_t batch, float* keys,
                              float* values, int64_t capacity, int64_t first, int64_t count, float* out,
                              int64_t threads, std::vector<float>& workspace);

// The step on a snapshot of the weights, packed once (HybridStreamer's).
class OneQueryAttention {
 public:
  // qkv_weight (3D, W): W_q, W_k, W_v stacked; out_weight (W, D); biases (3D,) and (W,) or null;
  // D = heads * head_dim. The weights are packed here (copies: the caller's may go).
  OneQueryAttention(const float* qkv_weight, const float* qkv_bias, const float* out_weight,
                    const float* out_bias, int64_t width, int64_t heads, int64_t head_dim);
  // Movable (weights_ points into storage that moves with it), not copyable.
  OneQueryAttention(OneQueryAttention&&) = default;
  OneQueryAttention(const OneQueryAttention&) = delete;
  OneQueryAttention& operator=(const OneQueryAttention&) = delete;

  // one_query_attention_step on these weights.
  void step(const float* y, int64_t batch, float* keys, float* values, int64_t capacity, int64_t first,
            int64_t count, float* out, int64_t threads) {
    one_query_attention_step(weights_, y, batch, keys, values, capacity, first, count, out, threads, workspace_);
  }

  int64_t width() const { return weights_.width; }
  int64_t attention_width() const { return weights_.heads * weights_.head_dim; }

 private:
  std::vector<float> qkv_storage_, out_storage_, qkv_bias_, out_bias_;
  OneQueryWeights weights_;
  std::vector<float> workspace_;  // the step's product, query, context and softmax scratch
};

}  // namespace rnnattn
