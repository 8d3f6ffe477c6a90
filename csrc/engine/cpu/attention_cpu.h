// The attention stage (engine/attention_step.h) for float on the CPU, with the head's columns in
// 8-lane vectors: the same sums as the shared scalar code, added in another order (as the CUDA
// kernel's are), for a head_dim that is a multiple of 8; other shapes and double run the shared code.
// Implemented twice (baseline x86-64 and AVX2+FMA) from one source; the caller picks at run time.
#pragma once
#include <cstdint>

#include "engine/attention_step.h"

namespace rnnattn::cpu {

// Every (row, head) pair the arguments cover: staging and forward, or backward and unstaging.
using AttentionPassFn = void (*)(const AttentionStepArgs<float>& args);

#define RNNATTN_DECLARE_CPU_ATTENTION(ns)                        \
  namespace ns {                                                 \
  void attention_forward_pass(const AttentionStepArgs<float>& args);  \
  void attention_backward_pass(const AttentionStepArgs<float>& args); \
  }
RNNATTN_DECLARE_CPU_ATTENTION(baseline)
RNNATTN_DECLARE_CPU_ATTENTION(avx2)
#undef RNNATTN_DECLARE_CPU_ATTENTION

constexpr int64_t kAttentionLanes = 8;

// Whether the vector passes serve these arguments.
inline bool vector_attention_applies(const AttentionStepArgs<float>& args) {
  return args.head_dim % kAttentionLanes == 0;
}

AttentionPassFn attention_forward_fn();
AttentionPassFn attention_backward_fn();

}  // namespace rnnattn::cpu
