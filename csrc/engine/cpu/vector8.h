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

// The sum of the eight lanes, always added in this order (results stay the same run to run).
inline __attribute__((always_inline)) float sum8(vec8 v) {
  float l[8];
  store8(l, v);
  return ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]));
}

}  // namespace
}  // namespace rnnattn::cpu::RNNATTN_CPU_ISA
