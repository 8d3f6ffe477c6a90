// 8-float vectors (GCC vector extensions) for the CPU kernels compiled once per instruction set:
// one AVX register in the avx2 build, a pair of SSE registers in the baseline one. Included by the
// kernels' *_impl.h headers, inside the namespace their .cpp names by RNNATTN_CPU_ISA, so that each
// build has its own copy.
#pragma once
#include <cstdint>
#include <cstring>

namespace rnnattn::cpu::RNNATTN_CPU_ISA {
namespace {

typedef float vec8 __attribute__((vector_size(32)));

inline __attribute__((always_inline)) vec8 load8(const float* p) {
  vec8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Eight bfloat16 widened to floats (exact: a bfloat16 is a float's high half).
inline __attribute__((always_inline)) vec8 load8(const uint16_t* p) {
  typedef uint16_t vec8h __attribute__((vector_size(16)));
  typedef uint32_t vec8u __attribute__((vector_size(32)));
  vec8h halves;
  std::memcpy(&halves, p, sizeof(halves));
  const vec8u bits = __builtin_convertvector(halves, vec8u) << 16;
  vec8 v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

// One value, as load8 widens it (a float as it is).
inline __attribute__((always_inline)) float widen(float x) { return x; }
inline __attribute__((always_inline)) float widen(uint16_t half) {
  const uint32_t bits = static_cast<uint32_t>(half) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
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
