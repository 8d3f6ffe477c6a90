#include "engine/one_query_attention.h"

#include <algorithm>
#include <cmath>
#include <tuple>

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

// Part c of `parts` of the packed matrix's panels: the columns [col, col + n) of the product.
struct PanelShare {
  cpu::PackedMatrix matrix;
  int64_t col = 0;
};

PanelShare panel_share(const cpu::PackedMatrix& m, int64_t c, int64_t parts) {
  const int64_t panels = (m.n + cpu::kPanelWidth - 1) / cpu::kPanelWidth;
  const auto [begin, end] = even_share(panels, c, parts);
  PanelShare share;
  share.col = begin * cpu::kPanelWidth;
  share.matrix.k = m.k;
  share.matrix.n = std::max<int64_t>(0, std::min(end * cpu::kPanelWidth, m.n) - share.col);
  share.matrix.panels = m.panels + begin * m.k * cpu::kPanelWidth;
  return share;
}

}  // namespace

OneQueryAttention::OneQueryAttention(const float* qkv_weight, const float* qkv_bias, const float* out_weight,
                                     const float* out_bias, int64_t width, int64_t heads, int64_t head_dim)
    : width_(width), heads_(heads), head_dim_(head_dim) {
  const int64_t d = heads * head_dim;
  qkv_storage_.resize(cpu::PackedMatrix::floats_needed(3 * d, width));
  out_storage_.resize(cpu::PackedMatrix::floats_needed(width, d));
  qkv_ = cpu::pack_matrix(row_table(qkv_weight, 3 * d, width).data(), 3 * d, width, 1, qkv_storage_.data());
  out_ = cpu::pack_matrix(row_table(out_weight, width, d).data(), width, d, 1, out_storage_.data());
  if (qkv_bias != nullptr) qkv_bias_.assign(qkv_bias, qkv_bias + 3 * d);
  if (out_bias != nullptr) out_bias_.assign(out_bias, out_bias + width);
}

void OneQueryAttention::step(const float* y, int64_t batch, float* keys, float* values, int64_t capacity,
                             int64_t first, int64_t count, float* out, int64_t threads) {
  if (batch == 0) return;
  const int64_t d = attention_width(), slots = count + 1;
  workspace_.resize(batch * (3 * d + 2 * d + heads_ * 2 * slots));
  float* product = workspace_.data();  // (batch, 3D): this position's query, key and value
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
  attention.heads = heads_;
  attention.head_dim = head_dim_;
  attention.scale = 1.0 / std::sqrt(static_cast<double>(head_dim_));
  attention.scratch = scratch;
  attention.scratch_slots = slots;
  attention.staged = {product, 3 * d, d, 0, nullptr, first + count};  // the product already has its bias

  const float* qkv_bias = qkv_bias_.empty() ? nullptr : qkv_bias_.data();
  const float* out_bias = out_bias_.empty() ? nullptr : out_bias_.data();
  const cpu::PackedGemmFn gemm = cpu::gemm_packed_fn();
  const bool vector_attention = cpu::vector_attention_applies(attention);
  const int64_t parts = std::max<int64_t>(1, threads);  // a part past the heads attends none
  run_team(parts, /*aten_state=*/false, [&](const TeamMember& member) {
    member.for_each_block([&](int64_t c) {
      const PanelShare share = panel_share(qkv_, c, parts);
      gemm(y, batch, width_, share.matrix, qkv_bias == nullptr ? nullptr : qkv_bias + share.col,
           product + share.col, 3 * d);
    });
    if (!member.sync()) return;
    member.for_each_block([&](int64_t c) {
      AttentionStepArgs<float> heads = attention;
      std::tie(heads.head_begin, heads.head_end) = even_share(heads_, c, parts);
      if (vector_attention) {
        cpu::attention_forward_fn()(heads);
      } else {
        attention_forward_pairs(heads);
      }
    });
    if (!member.sync()) return;
    member.for_each_block([&](int64_t c) {
      const PanelShare share = panel_share(out_, c, parts);
      gemm(context, batch, d, share.matrix, out_bias == nullptr ? nullptr : out_bias + share.col, out + share.col,
           width_);
      for (int64_t b = 0; b < batch; ++b) {
        for (int64_t j = share.col; j < share.col + share.matrix.n; ++j) out[b * width_ + j] += y[b * width_ + j];
      }
    });
  });
}

}  // namespace rnnattn
