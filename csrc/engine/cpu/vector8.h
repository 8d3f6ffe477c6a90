// 8-float vectors (GCC vector extensions) for the CPU kernels compiled once per instruction set:
// one AVX register in the avx2 build, a pair of SSE registers in the baseline one. Included by the
// kernels' *_impl.h headers, inside the namespace their .cpp names by RNNATTN_CPU_ISA, so that each
// build has its own copy.
#pragma once
#include <cstring>

namespace rnnattn::cpu::RNNATTN_CPU_ISA {
namespace {

typedef float vec8 __attribute__((vector_size(32)));

inline __attribute__((always_inline)) vec8 load8(const float* p) {
  vec8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline __attribute__((always_inline)) void store8(float* p, vec8 v) { std::memcpy(p, &v, sizeof(v)); }

inline __attribute__((always_inline)) vec8 broadcast8(float s) { return vec8{s, s, s, s, s, s, s, s}; }

// The sum of the eight lanes, always added in this order (results stay the same run to run), in
// registers: the halves added as 4-lane vectors, then their lanes (a store and scalar reloads of an
// accumulator stall on store forwarding, which costs a one-row product a quarter of its time).
inline __attribute__((always_inline)) float sum8(vec8 v) {
  typedef float vec4 __attribute__((vector_size(16)));
  vec4 low, high;
  std::memcpy(&low, &v, sizeof(low));
  std::memcpy(&high, reinterpret_cast<const char*>(&v) + sizeof(low), sizeof(high));
  const vec4 pairs = low + high;  // lanes 0+4, 1+5, 2+6, 3+7
  return (pairs[0] + pairs[1]) + (pairs[2] + pairs[3]);
}

}  // namespace
}  // namespace rnnattn::cpu::RNNATTN_CPU_ISA
