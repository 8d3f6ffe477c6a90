// The attention stage of one step of the attention-augmented cell (SPEC "The attention-augmented
// cell"), for one batch row and one head: scaled dot-product scores over the row's memory slots,
// softmax, context; and its backward. The CPU loops run these per (row, head) (for float with a
// head_dim that is a multiple of 8, cpu/attention_cpu.h runs the same steps in vectors); the CUDA
// kernels (cuda/attention_cuda.cu) spread the same sums over a warp and share the staging and
// slot-range helpers. Free of torch.
//
// Layouts (D = heads * head_dim; column d of head h is h * head_dim + d):
//   query, grad_query, context, grad_context: row b at ptr + b * stride;
//   keys, values: slot s of row b at ptr + s * slot_stride + b * row_stride;
//   grad_keys, grad_values: column d of head h of slot s of row b at ptr + grad_offset(a, b, h, s) + d
//     (grad_slot_stride, grad_row_stride, grad_head_stride: the CPU gives each (row, head) pair its
//     slots one after another, where the store's layout interleaves the heads);
//   weights: (B, heads, weight_slots), the n slots a row reads at [offset, offset + n) where offset is
//     weight_slots - n for self memory (the most recent slot last) and 0 for external memory.
//
// Softmax statistics are not saved: backward recomputes them (a few dot products per slot), which
// keeps training memory at O(T * B * D) for any window and the statistics in fp32 for 16-bit types.
// Each (row, head) pass keeps its per-slot numbers in `scratch` (accumulate type, 2 * scratch_slots
// per pair), so every score is computed once per pass.
//
// The step's product h_{t-1} @ W_rec^T holds the attention rows (SlotRows): the query and, for self
// memory, the new slot's key and value. A forward pass first stages its (row, head)'s share of them
// into the store (query, keys, values), adding their bias where the product left it out (CUDA); a
// backward pass ends by writing the new slot's key and value gradients, final once this step has
// read the slot, back into the product's gradient rows. Each pair moves only its own columns, so
// staging needs no synchronisation beyond the pair's own.
#pragma once
#include <cstdint>

#include "engine/step_args.h"

namespace rnnattn {

// The attention rows of the step's product, for the heads a pass covers: column d (of D) of row b
// and part p (0 query, 1 key, 2 value) at rows[b * row_stride + p * part_stride + d - col0].
template <typename T>
struct SlotRows {
  T* rows;              // nullptr: nothing to stage (forward: read; backward: key and value parts written)
  int64_t row_stride;
  int64_t part_stride;
  int64_t col0;
  const T* bias;        // forward: added to the rows (bias[p * part_stride + d - col0]), or nullptr
  int64_t new_slot;     // self memory: the slot of this step's key and value; -1 for an external memory
};

template <typename T>
struct AttentionStepArgs {
  T* query;  // the forward stages into query, keys and values; the backward only reads them
  int64_t query_stride;
  T* keys;
  T* values;
  int64_t slot_stride, row_stride;
  bool self_memory;              // the slots are the cell's past states (else an external memory)
  int64_t first_slot, end_slot;  // every row reads slots [first_slot, end_slot) (external: [0, S))...
  const int64_t* lengths;        // ...except with an external memory's lengths: row b reads [0, lengths[b])
  // Variable lengths (SPEC): row b attends only at its valid steps (time < sequence_lengths[b]; the
  // others read no slot and get a zero context). Self memory in reverse also starts each row's memory
  // at its own first step: slot steps - sequence_lengths[b] holds its h_0.
  const int64_t* sequence_lengths;  // (B,) or nullptr
  int64_t time, steps;
  bool reverse;
  T* context;
  int64_t context_stride;
  T* weights;  // nullptr unless the caller asked for the attention weights
  int64_t weight_slots;
  int64_t batch, heads, head_dim;
  int64_t head_begin, head_end;  // the heads this pass covers (the CPU splits them over threads)
  int64_t row_begin = 0, row_end = -1;  // and the rows (row_end < 0: to batch; CUDA: every row)
  double scale;                  // 1 / sqrt(head_dim)
  void* scratch;                 // ScalarIO<T>::Acc, 2 * scratch_slots per (row, head) pair
  int64_t scratch_slots;         // at least the number of slots any row reads
  SlotRows<T> staged;            // the product's attention rows (see SlotRows)
  // Backward only.
  const T* grad_context;
  int64_t grad_context_stride;
  T* grad_query;
  int64_t grad_query_stride;
  T* grad_keys;  // accumulated (+=): a slot is read by several steps
  T* grad_values;
  int64_t grad_slot_stride, grad_row_stride, grad_head_stride;
};

// Where head h of slot s of row b starts in grad_keys and grad_values.
template <typename T>
RNNATTN_HD int64_t grad_offset(const AttentionStepArgs<T>& a, int64_t b, int64_t h, int64_t s) {
  return s * a.grad_slot_stride + b * a.grad_row_stride + h * a.grad_head_stride;
}

// The parts of the product a (row, head) pair stages: the query, and the new slot's key and value.
template <typename T>
RNNATTN_HD int64_t staged_elements(const AttentionStepArgs<T>& a) {
  return a.staged.rows == nullptr ? 0 : (a.staged.new_slot >= 0 ? 3 : 1) * a.head_dim;
}

// Where part p (0 query, 1 key, 2 value) of row b's staged rows starts, relative to column d of
// D: its offset in a product row (and in the bias), and the store row it goes to (index it with d).
template <typename T>
RNNATTN_HD int64_t staged_offset(const AttentionStepArgs<T>& a, int64_t part, int64_t d) {
  return part * a.staged.part_stride + d - a.staged.col0;
}
template <typename T>
RNNATTN_HD T* staged_destination(const AttentionStepArgs<T>& a, int64_t b, int64_t part) {
  return part == 0 ? a.query + b * a.query_stride
                   : (part == 1 ? a.keys : a.values) + a.staged.new_slot * a.slot_stride + b * a.row_stride;
}

// Forward: element i < staged_elements(a) of row b, head h, from the product (plus bias) to the store.
template <typename T>
RNNATTN_HD void stage_element(const AttentionStepArgs<T>& a, int64_t b, int64_t h, int64_t i) {
  using IO = ScalarIO<T>;
  using A = typename IO::Acc;
  const int64_t part = i / a.head_dim, d = h * a.head_dim + i % a.head_dim;
  const int64_t at = staged_offset(a, part, d);
  A v = IO::load(a.staged.rows[b * a.staged.row_stride + at]);
  if (a.staged.bias != nullptr) v += IO::load(a.staged.bias[at]);
  staged_destination(a, b, part)[d] = IO::store(v);
}

template <typename T>
RNNATTN_HD int64_t unstaged_elements(const AttentionStepArgs<T>& a) {
  return a.staged.rows == nullptr || a.staged.new_slot < 0 ? 0 : 2 * a.head_dim;
}

// Backward: element i < unstaged_elements(a) of row b, head h: the new slot's key (i < head_dim) or
// value gradient, into the product's gradient rows.
template <typename T>
RNNATTN_HD void unstage_element(const AttentionStepArgs<T>& a, int64_t b, int64_t h, int64_t i) {
  const int64_t part = 1 + i / a.head_dim, d = i % a.head_dim;
  const T* from = (part == 1 ? a.grad_keys : a.grad_values) + grad_offset(a, b, h, a.staged.new_slot);
  a.staged.rows[b * a.staged.row_stride + staged_offset(a, part, h * a.head_dim + d)] = from[d];
}

namespace attention_detail {

// Context and query gradients are accumulated in registers, this many columns at a time.
constexpr int kChunk = 32;

template <typename A>
RNNATTN_HD A exp_(A x) {
  return exp(x);
}
template <>
RNNATTN_HD float exp_(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return std::exp(x);
#endif
}

template <typename T, typename A>
RNNATTN_HD A dot(const T* x, const T* y, int64_t n) {
  using IO = ScalarIO<T>;
  A acc = A(0);
  for (int64_t d = 0; d < n; ++d) acc += A(IO::load(x[d])) * A(IO::load(y[d]));
  return acc;
}

// The slots row b reads.
template <typename T>
RNNATTN_HD void slot_range(const AttentionStepArgs<T>& a, int64_t b, int64_t& first, int64_t& end) {
  first = a.first_slot;
  end = a.lengths != nullptr ? a.lengths[b] : a.end_slot;
  if (a.sequence_lengths != nullptr) {
    const int64_t valid = a.sequence_lengths[b];
    if (a.time >= valid) {
      first = end = 0;
    } else if (a.self_memory && a.reverse && first < a.steps - valid) {
      first = a.steps - valid;
    }
  }
}

// Softmax weights of row b, head h over its slots [first, end): p[s - first], in the pair's scratch.
template <typename T, typename A>
RNNATTN_HD A* softmax_weights(const AttentionStepArgs<T>& a, const T* q, int64_t b, int64_t h, int64_t first,
                              int64_t end) {
  A* p = static_cast<A*>(a.scratch) + (b * a.heads + h) * 2 * a.scratch_slots;
  if (end <= first) return p;  // a held row: no slots, a zero context
  const int64_t col = h * a.head_dim;
  const A scale = A(a.scale);
  A max_score = A(-INFINITY);
  for (int64_t s = first; s < end; ++s) {
    const A score = dot<T, A>(q, a.keys + s * a.slot_stride + b * a.row_stride + col, a.head_dim) * scale;
    p[s - first] = score;
    max_score = score > max_score ? score : max_score;
  }
  A denominator = A(0);
  for (int64_t i = 0; i < end - first; ++i) {
    p[i] = exp_(p[i] - max_score);
    denominator += p[i];
  }
  const A inv = A(1) / denominator;
  for (int64_t i = 0; i < end - first; ++i) p[i] *= inv;
  return p;
}

// out[d] = sum over slots s of coef[s - first] * rows[s][d], d < head_dim (rows: the keys or the
// values of row b, head column col), accumulated in registers a chunk of columns at a time.
template <typename T, typename A>
RNNATTN_HD void combine_slots(const AttentionStepArgs<T>& a, const T* rows, int64_t b, int64_t col, const A* coef,
                              int64_t first, int64_t end, T* out) {
  using IO = ScalarIO<T>;
  for (int64_t d0 = 0; d0 < a.head_dim; d0 += kChunk) {
    const int64_t width = a.head_dim - d0 < kChunk ? a.head_dim - d0 : kChunk;
    A acc[kChunk];
    for (int d = 0; d < kChunk; ++d) acc[d] = A(0);
    for (int64_t s = first; s < end; ++s) {
      const T* row = rows + s * a.slot_stride + b * a.row_stride + col + d0;
      const A c = coef[s - first];
      for (int64_t d = 0; d < width; ++d) acc[d] += c * A(IO::load(row[d]));
    }
    for (int64_t d = 0; d < width; ++d) out[d0 + d] = IO::store(acc[d]);
  }
}

}  // namespace attention_detail

// context[b, head h] = sum over slots of softmax(q . k / sqrt(head_dim)) v; weights if requested.
template <typename T>
RNNATTN_HD void attend_forward(const AttentionStepArgs<T>& a, int64_t b, int64_t h) {
  using namespace attention_detail;
  using IO = ScalarIO<T>;
  using A = typename IO::Acc;
  const int64_t col = h * a.head_dim;
  const T* q = a.query + b * a.query_stride + col;
  int64_t first, end;
  slot_range(a, b, first, end);
  const A* p = softmax_weights<T, A>(a, q, b, h, first, end);
  combine_slots(a, a.values, b, col, p, first, end, a.context + b * a.context_stride + col);
  if (a.weights != nullptr) {
    const int64_t offset = a.self_memory ? a.weight_slots - (end - first) : 0;
    T* w = a.weights + (b * a.heads + h) * a.weight_slots + offset;
    for (int64_t i = 0; i < end - first; ++i) w[i] = IO::store(p[i]);
  }
}

// With p_s the softmax weights and g = grad_context: dp_s = g . v_s, dscore_s = p_s (dp_s - g . ctx)
// where g . ctx = sum_s p_s dp_s; then grad_query = scale * sum_s dscore_s k_s (written),
// grad_keys[s] += scale * dscore_s q, grad_values[s] += p_s g.
template <typename T>
RNNATTN_HD void attend_backward(const AttentionStepArgs<T>& a, int64_t b, int64_t h) {
  using namespace attention_detail;
  using IO = ScalarIO<T>;
  using A = typename IO::Acc;
  const int64_t col = h * a.head_dim;
  const T* q = a.query + b * a.query_stride + col;
  const T* g = a.grad_context + b * a.grad_context_stride + col;
  const A scale = A(a.scale);
  int64_t first, end;
  slot_range(a, b, first, end);
  const A* p = softmax_weights<T, A>(a, q, b, h, first, end);
  A* dscore = static_cast<A*>(a.scratch) + (b * a.heads + h) * 2 * a.scratch_slots + a.scratch_slots;
  A g_dot_ctx = A(0);
  for (int64_t s = first; s < end; ++s) {
    const A dp = dot<T, A>(g, a.values + s * a.slot_stride + b * a.row_stride + col, a.head_dim);
    dscore[s - first] = dp;
    g_dot_ctx += p[s - first] * dp;
  }
  for (int64_t i = 0; i < end - first; ++i) dscore[i] = p[i] * (dscore[i] - g_dot_ctx) * scale;
  combine_slots(a, a.keys, b, col, dscore, first, end, a.grad_query + b * a.grad_query_stride + col);
  for (int64_t s = first; s < end; ++s) {
    const int64_t at = grad_offset(a, b, h, s);
    const A ds = dscore[s - first], weight = p[s - first];
    T* dk = a.grad_keys + at;
    T* dv = a.grad_values + at;
    for (int64_t d = 0; d < a.head_dim; ++d) {
      dk[d] = IO::store(A(IO::load(dk[d])) + ds * A(IO::load(q[d])));
      dv[d] = IO::store(A(IO::load(dv[d])) + weight * A(IO::load(g[d])));
    }
  }
}

// The CPU's pass over every (row, head) pair the arguments cover, in the shared code: staging and
// forward (the CUDA kernel gives each pair a warp instead).
template <typename T>
void attention_forward_pairs(const AttentionStepArgs<T>& a) {
  for (int64_t b = a.row_begin, end = row_end(a); b < end; ++b) {
    for (int64_t h = a.head_begin; h < a.head_end; ++h) {
      for (int64_t i = 0; i < staged_elements(a); ++i) stage_element(a, b, h, i);
      attend_forward(a, b, h);
    }
  }
}

// Backward and unstaging, likewise.
template <typename T>
void attention_backward_pairs(const AttentionStepArgs<T>& a) {
  for (int64_t b = a.row_begin, end = row_end(a); b < end; ++b) {
    for (int64_t h = a.head_begin; h < a.head_end; ++h) {
      attend_backward(a, b, h);
      for (int64_t i = 0; i < unstaged_elements(a); ++i) unstage_element(a, b, h, i);
    }
  }
}

}  // namespace rnnattn
