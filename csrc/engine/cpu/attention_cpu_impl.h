// The vector attention passes of attention_cpu.h, written with GCC vector extensions so that one
// source compiles to AVX2+FMA (8-float registers) and to baseline SSE2 (pairs of 4-float registers).
// Included by one .cpp per instruction set, which defines RNNATTN_CPU_ISA.
//
// Per (row, head) the steps are those of attention_step.h: scores, softmax, context; backward
// recomputes the softmax, then dp_s = g . v_s, dscore_s = p_s (dp_s - g . ctx) * scale, the query
// gradient and the slots' key and value gradients. Dot products keep 8 partial sums per slot (eight
// slots at a time, so that the FMAs do not wait on each other), combined in a fixed order: results
// are deterministic run to run. e^x is the pointwise passes' polynomial (math::fast_exp).
#pragma once
#include <cstring>

#include "engine/cpu/attention_cpu.h"
#include "engine/cpu/vector8.h"

namespace rnnattn::cpu::RNNATTN_CPU_ISA {
namespace {

// One (row, head) pair's view of the slot store: slot s's head columns at base + s * stride.
struct SlotColumns {
  const float* base;
  int64_t stride;
  const float* at(int64_t s) const { return base + s * stride; }
};

// Lane i of the result: the sum of v[i]'s eight lanes, added in the same order for every i, as
// pairwise sums of adjacent lanes (the shuffles are what AVX's horizontal adds do, here for any ISA).
inline vec8 sum8_each(const vec8 v[8]) {
  typedef int lanes8 __attribute__((vector_size(32)));
  // [a01, a23, b01, b23 | a45, a67, b45, b67] (aij: lanes i + j of a)
  auto pairs = [](vec8 a, vec8 b) {
    return __builtin_shuffle(a, b, lanes8{0, 2, 8, 10, 4, 6, 12, 14}) +
           __builtin_shuffle(a, b, lanes8{1, 3, 9, 11, 5, 7, 13, 15});
  };
  // [v0 0123, v1 0123, v2 0123, v3 0123 | v0 4567, ...], likewise for v4..v7
  const vec8 low = pairs(pairs(v[0], v[1]), pairs(v[2], v[3]));
  const vec8 high = pairs(pairs(v[4], v[5]), pairs(v[6], v[7]));
  return __builtin_shuffle(low, high, lanes8{0, 1, 2, 3, 8, 9, 10, 11}) +
         __builtin_shuffle(low, high, lanes8{4, 5, 6, 7, 12, 13, 14, 15});
}

// out[s - first] = scale * (x . rows[s]) for s in [first, end); n (a multiple of 8) columns. Eight
// slots at a time, each with its own 8-lane sums; a last group of fewer slots repeats its last one,
// so that every score is added up the same way wherever its slot falls.
void dot_slots(const float* x, SlotColumns rows, int64_t n, float scale, int64_t first, int64_t end, float* out) {
  for (int64_t s = first; s < end; s += 8) {
    const int64_t count = end - s < 8 ? end - s : 8;
    const float* row[8];
    for (int i = 0; i < 8; ++i) row[i] = rows.at(s + (i < count ? i : count - 1));
    vec8 acc[8] = {};
    for (int64_t d = 0; d < n; d += 8) {
      const vec8 xv = load8(x + d);
      for (int i = 0; i < 8; ++i) acc[i] += xv * load8(row[i] + d);
    }
    const vec8 scores = sum8_each(acc) * broadcast8(scale);
    if (count == 8) {
      store8(out + s - first, scores);
    } else {
      float lanes[8];
      store8(lanes, scores);
      std::memcpy(out + s - first, lanes, count * sizeof(float));
    }
  }
}

// The sum of p[0, count) in 8 lanes.
float sum_lanes(const float* p, int64_t count) {
  vec8 acc = {};
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) acc += load8(p + i);
  float total = sum8(acc);
  for (; i < count; ++i) total += p[i];
  return total;
}

// The largest of p[0, count), NaN skipped (-inf if all are NaN), eight lanes at a time: GCC leaves
// a comparison that skips NaN scalar (AttnLSTM(256) at 16x128, window 128: the softmax 1.9% of the
// forward's samples, 1.4% so). Any order of the comparisons finds the same value (but for the sign
// of a zero, which changes no softmax weight).
float max_skipping_nan(const float* p, int64_t count) {
  vec8 lanes = broadcast8(-INFINITY);
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const vec8 v = load8(p + i);
    lanes = v > lanes ? v : lanes;
  }
  float largest = -INFINITY;
  for (int l = 0; l < 8; ++l) largest = lanes[l] > largest ? lanes[l] : largest;
  for (; i < count; ++i) largest = p[i] > largest ? p[i] : largest;
  return largest;
}

// Softmax over the scores p[0, count), in place. NaN scores are skipped by the maximum (as the
// scalar code's) and make every weight NaN through the denominator.
void softmax_in_place(float* p, int64_t count) {
  const float max_score = max_skipping_nan(p, count);
  for (int64_t i = 0; i < count; ++i) {
    const float x = p[i] - max_score;
    // Below -87.3 (e^x under the normal floats) the weight is 0, as expf's would all but be.
    p[i] = x < -87.3f ? 0.f : math::fast_exp(x);
  }
  const float inv = 1.f / sum_lanes(p, count);
  for (int64_t i = 0; i < count; ++i) p[i] *= inv;
}

// out[d] = sum over s in [first, end) of coef[s - first] * rows[s][d], d < n (a multiple of 8),
// kVecs vectors of columns at a time; two sets of sums (even and odd slots) halve the wait on
// each FMA's result, added at the end.
template <int kVecs>
void combine_chunk(SlotColumns rows, const float* coef, int64_t first, int64_t end, float* out) {
  vec8 even[kVecs] = {}, odd[kVecs] = {};
  int64_t s = first;
  for (; s + 2 <= end; s += 2) {
    const vec8 c0 = broadcast8(coef[s - first]), c1 = broadcast8(coef[s + 1 - first]);
    const float* r0 = rows.at(s);
    const float* r1 = rows.at(s + 1);
    for (int v = 0; v < kVecs; ++v) {
      even[v] += c0 * load8(r0 + 8 * v);
      odd[v] += c1 * load8(r1 + 8 * v);
    }
  }
  if (s < end) {
    const vec8 c0 = broadcast8(coef[s - first]);
    for (int v = 0; v < kVecs; ++v) even[v] += c0 * load8(rows.at(s) + 8 * v);
  }
  for (int v = 0; v < kVecs; ++v) store8(out + 8 * v, even[v] + odd[v]);
}

void combine(SlotColumns rows, int64_t n, const float* coef, int64_t first, int64_t end, float* out) {
  for (int64_t d = 0; d < n; d += 32) {
    const SlotColumns part{rows.base + d, rows.stride};
    switch ((n - d < 32 ? n - d : 32) / 8) {
      case 1: combine_chunk<1>(part, coef, first, end, out + d); break;
      case 2: combine_chunk<2>(part, coef, first, end, out + d); break;
      case 3: combine_chunk<3>(part, coef, first, end, out + d); break;
      default: combine_chunk<4>(part, coef, first, end, out + d); break;
    }
  }
}

// The pair's softmax weights over its slots [first, end), in its scratch; returns them.
float* weights_of(const AttentionStepArgs<float>& a, const float* q, SlotColumns keys, int64_t b, int64_t h,
                  int64_t first, int64_t end) {
  float* p = static_cast<float*>(a.scratch) + (b * a.heads + h) * 2 * a.scratch_slots;
  if (end <= first) return p;
  dot_slots(q, keys, a.head_dim, static_cast<float>(a.scale), first, end, p);
  softmax_in_place(p, end - first);
  return p;
}

// stage_element for the pair's every element, eight columns at a time.
void stage_vec(const AttentionStepArgs<float>& a, int64_t b, int64_t h) {
  if (a.staged.rows == nullptr) return;
  const int64_t parts = a.staged.new_slot >= 0 ? 3 : 1, col = h * a.head_dim;
  for (int64_t part = 0; part < parts; ++part) {
    const int64_t at = staged_offset(a, part, col);
    const float* from = a.staged.rows + b * a.staged.row_stride + at;
    float* to = staged_destination(a, b, part) + col;
    for (int64_t d = 0; d < a.head_dim; d += 8) {
      store8(to + d, a.staged.bias != nullptr ? load8(from + d) + load8(a.staged.bias + at + d) : load8(from + d));
    }
  }
}

// unstage_element for the pair's every element, eight columns at a time (no division per element).
void unstage_vec(const AttentionStepArgs<float>& a, int64_t b, int64_t h) {
  if (unstaged_elements(a) == 0) return;
  for (int64_t part = 1; part <= 2; ++part) {
    const float* from = (part == 1 ? a.grad_keys : a.grad_values) + grad_offset(a, b, h, a.staged.new_slot);
    float* to = a.staged.rows + b * a.staged.row_stride + staged_offset(a, part, h * a.head_dim);
    for (int64_t d = 0; d < a.head_dim; d += 8) store8(to + d, load8(from + d));
  }
}

void attend_forward_vec(const AttentionStepArgs<float>& a, int64_t b, int64_t h) {
  const int64_t col = h * a.head_dim, n = a.head_dim;
  const float* q = a.query + b * a.query_stride + col;
  const SlotColumns keys{a.keys + b * a.row_stride + col, a.slot_stride};
  const SlotColumns values{a.values + b * a.row_stride + col, a.slot_stride};
  int64_t first, end;
  attention_detail::slot_range(a, b, first, end);
  const float* p = weights_of(a, q, keys, b, h, first, end);
  float* context = a.context + b * a.context_stride + col;
  if (end <= first) {
    std::memset(context, 0, n * sizeof(float));  // a held row: no slots, a zero context
  } else {
    combine(values, n, p, first, end, context);
  }
  if (a.weights != nullptr) {
    const int64_t offset = a.self_memory ? a.weight_slots - (end - first) : 0;
    float* w = a.weights + (b * a.heads + h) * a.weight_slots + offset;
    for (int64_t i = 0; i < end - first; ++i) w[i] = p[i];
  }
}

void attend_backward_vec(const AttentionStepArgs<float>& a, int64_t b, int64_t h) {
  const int64_t col = h * a.head_dim, n = a.head_dim;
  const float* q = a.query + b * a.query_stride + col;
  const float* g = a.grad_context + b * a.grad_context_stride + col;
  const SlotColumns keys{a.keys + b * a.row_stride + col, a.slot_stride};
  const SlotColumns values{a.values + b * a.row_stride + col, a.slot_stride};
  int64_t first, end;
  attention_detail::slot_range(a, b, first, end);
  float* grad_query = a.grad_query + b * a.grad_query_stride + col;
  if (end <= first) {
    std::memset(grad_query, 0, n * sizeof(float));
    return;
  }
  float* p = weights_of(a, q, keys, b, h, first, end);
  const int64_t count = end - first;
  float* dscore = p + a.scratch_slots;  // the pair's second scratch row
  dot_slots(g, values, n, 1.f, first, end, dscore);  // dp_s
  // g . ctx = sum_s p_s dp_s
  vec8 acc = {};
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) acc += load8(p + i) * load8(dscore + i);
  float g_dot_ctx = sum8(acc);
  for (; i < count; ++i) g_dot_ctx += p[i] * dscore[i];
  const float scale = static_cast<float>(a.scale);
  for (i = 0; i < count; ++i) dscore[i] = p[i] * (dscore[i] - g_dot_ctx) * scale;
  combine(keys, n, dscore, first, end, grad_query);
  for (int64_t s = first; s < end; ++s) {
    const int64_t at = grad_offset(a, b, h, s);
    const vec8 ds = broadcast8(dscore[s - first]), weight = broadcast8(p[s - first]);
    float* dk = a.grad_keys + at;
    float* dv = a.grad_values + at;
    for (int64_t d = 0; d < n; d += 8) {
      store8(dk + d, load8(dk + d) + ds * load8(q + d));
      store8(dv + d, load8(dv + d) + weight * load8(g + d));
    }
  }
}

}  // namespace

void attention_forward_pass(const AttentionStepArgs<float>& args) {
  for (int64_t b = args.row_begin, end = row_end(args); b < end; ++b) {
    for (int64_t h = args.head_begin; h < args.head_end; ++h) {
      stage_vec(args, b, h);
      attend_forward_vec(args, b, h);
    }
  }
}

void attention_backward_pass(const AttentionStepArgs<float>& args) {
  for (int64_t b = args.row_begin, end = row_end(args); b < end; ++b) {
    for (int64_t h = args.head_begin; h < args.head_end; ++h) {
      attend_backward_vec(args, b, h);
      unstage_vec(args, b, h);
    }
  }
}

}  // namespace rnnattn::cpu::RNNATTN_CPU_ISA
