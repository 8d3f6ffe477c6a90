#include "engine/one_query_attention.h"

#include <algorithm>
#include <cmath>
#include <tuple>
#include <utility>
#include <vector>

#include "engine/attention_step.h"
#include "engine/cpu/attention_cpu.h"
#include "engine/thread_team.h"

namespace rnnattn {
namespace {

std::vector<const float*> row_table(const float* matrix, int64_t rows, int64_t columns) {
  std::vector<const float*> table(rows);
  for (int64_t i = 0; i < rows; ++i) table[i] = matrix + i * columns;
  return table;
}

// Part c of `parts` of the product a @ M^T (+ bias): whole panels of 16 columns, [col, col + n).
// Returns {col, n}.
std::pair<int64_t, int64_t> multiply_share(const OneQueryMatrix& m, int64_t c, int64_t parts, const float* a,
                                           int64_t batch, int64_t lda, const float* bias, float* out, int64_t ldo) {
  const int64_t panels = (m.n + cpu::kPanelWidth - 1) / cpu::kPanelWidth;
  const auto [begin, end] = even_share(panels, c, parts);
  const int64_t col = begin * cpu::kPanelWidth;
  const int64_t n = std::max<int64_t>(0, std::min(end * cpu::kPanelWidth, m.n) - col);
  if (n == 0) return {col, 0};
  const float* share_bias = bias == nullptr ? nullptr : bias + col;
  if (m.packed.panels != nullptr) {
    cpu::PackedMatrix share;
    share.k = m.k;
    share.n = n;
    share.panels = m.packed.panels + begin * m.k * cpu::kPanelWidth;
    cpu::gemm_packed_fn()(a, batch, lda, share, share_bias, out + col, ldo, /*accumulate=*/false);
  } else {
    cpu::gemm_rows_fn()(a, batch, lda, cpu::RowsMatrix{m.rows + col, n, m.k}, share_bias, out + col, ldo);
  }
  return {col, n};
}

OneQueryMatrix packed_copy(const float* matrix, int64_t n, int64_t k, std::vector<float>& storage) {
  storage.resize(cpu::PackedMatrix::floats_needed(n, k));
  OneQueryMatrix m;
  m.n = n;
  m.k = k;
  m.packed = cpu::pack_matrix(row_table(matrix, n, k).data(), n, k, 1, storage.data());
  return m;
}

}  // namespace

OneQueryAttention::OneQueryAttention(const float* qkv_weight, const float* qkv_bias, const float* out_weight,
                                     const float* out_bias, int64_t width, int64_t heads, int64_t head_dim) {
  const int64_t d = heads * head_dim;
  weights_.qkv = packed_copy(qkv_weight, 3 * d, width, qkv_storage_);
  weights_.out = packed_copy(out_weight, width, d, out_storage_);
  if (qkv_bias != nullptr) {
    qkv_bias_.assign(qkv_bias, qkv_bias + 3 * d);
    weights_.qkv_bias = qkv_bias_.data();
  }
  if (out_bias != nullptr) {
    out_bias_.assign(out_bias, out_bias + width);
    weights_.out_bias = out_bias_.data();
  }
  weights_.width = width;
  weights_.heads = heads;
  weights_.head_dim = head_dim;
}

void one_query_attention_step(const OneQueryWeights& weights, const float* y, int64_t batch, float* keys,
                              float* values, int64_t capacity, int64_t first, int64_t count, float* out,
                              int64_t threads, std::vector<float>& workspace) {
  if (batch == 0) return;
  const int64_t width = weights.width, heads = weights.heads, d = heads * weights.head_dim, slots = count + 1;
  workspace.resize(batch * (3 * d + 2 * d + heads * 2 * slots));
  float* product = workspace.data();  // (batch, 3D): this position's query, key and value
  float* query = product + batch * 3 * d;
  float* context = query + batch * d;
  float* scratch = context + batch * d;

  AttentionStepArgs<float> attention{};
  attention.query = query;
  attention.query_stride = d;
  attention.keys = keys;
  attention.values = values;
  attention.slot_stride = d;
  attention.row_stride = capacity * d;
  attention.self_memory = true;
  attention.first_slot = first;
  attention.end_slot = first + slots;
  attention.steps = 1;
  attention.context = context;
  attention.context_stride = d;
  attention.batch = batch;
  attention.heads = heads;
  attention.head_dim = weights.head_dim;
  attention.scale = 1.0 / std::sqrt(static_cast<double>(weights.head_dim));
  attention.scratch = scratch;
  attention.scratch_slots = slots;
  attention.staged = {product, 3 * d, d, 0, nullptr, first + count};  // the product already has its bias

  const bool vector_attention = cpu::vector_attention_applies(attention);
  const int64_t parts = std::max<int64_t>(1, threads);  // a part past the heads attends none
  run_team(parts, /*aten_state=*/false, [&](const TeamMember& member) {
    member.for_each_block([&](int64_t c) {
      multiply_share(weights.qkv, c, parts, y, batch, width, weights.qkv_bias, product, 3 * d);
    });
    if (!member.sync()) return;
    member.for_each_block([&](int64_t c) {
      AttentionStepArgs<float> own = attention;
      std::tie(own.head_begin, own.head_end) = even_share(heads, c, parts);
      if (vector_attention) {
        cpu::attention_forward_fn()(own);
      } else {
        attention_forward_pairs(own);
      }
    });
    if (!member.sync()) return;
    member.for_each_block([&](int64_t c) {
      const auto [col, n] = multiply_share(weights.out, c, parts, context, batch, d, weights.out_bias, out, width);
      for (int64_t b = 0; b < batch; ++b) {
        for (int64_t j = col; j < col + n; ++j) out[b * width + j] += y[b * width + j];
      }
    });
  });
}

}  // namespace rnnattn
