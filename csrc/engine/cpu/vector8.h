// 8-float vectors (GCC vector extensions) for the CPU kernels compiled once per instruction set:
// one AVX register in the avx2 build, a pair of SSE registers in the baseline one. Included by the
// kernels' *_impl.h headers, inside the namespace their .cpp names by RNNATTN_CPU_ISA, so that each
// build has its own copy.
#pragma once
#include <cstdint>
#include <cstring>
#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace rnnattn::cpu::RNNATTN_CPU_ISA {
namespace {

typedef float vec8 __attribute__((vector_size(32)));

inline __attribute__((always_inline)) vec8 load8(const float* p) {
  vec8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// 16-bit floats widened to float, exactly: eight at once (load8_*) or one (widen_*).
typedef uint16_t vec8h __attribute__((vector_size(16)));
typedef uint32_t vec8u __attribute__((vector_size(32)));
typedef int32_t vec8i __attribute__((vector_size(32)));

// 32 bytes of another type (vec8u, __m256, __m256i) read as the 8 floats they hold.
template <typename Register>
inline __attribute__((always_inline)) vec8 as_floats(const Register& r) {
  static_assert(sizeof(Register) == sizeof(vec8));
  vec8 v;
  std::memcpy(&v, &r, sizeof(v));
  return v;
}

// bfloat16: a float's high half.
inline __attribute__((always_inline)) vec8 load8_bf16(const uint16_t* p) {
#if defined(__AVX2__)
  // One widening move and a shift (GCC splits __builtin_convertvector's into 128-bit halves: 5 ops).
  const __m128i halves = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return as_floats(_mm256_slli_epi32(_mm256_cvtepu16_epi32(halves), 16));
#else
  vec8h halves;
  std::memcpy(&halves, p, sizeof(halves));
  return as_floats(__builtin_convertvector(halves, vec8u) << 16);
#endif
}

// IEEE float16: the exponent rebiased (15 -> 127; 31, infinities and NaNs, -> 255), the mantissa
// moved up; zeros and subnormals (m * 2^-24, m < 1024) through an exact int-to-float conversion.
inline __attribute__((always_inline)) vec8 load8_f16(const uint16_t* p) {
#if defined(__F16C__)
  // The same values in one instruction (the x86 builds have F16C).
  return as_floats(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
  vec8h halves;
  std::memcpy(&halves, p, sizeof(halves));
  const vec8u u = __builtin_convertvector(halves, vec8u);
  const vec8u sign = (u & 0x8000u) << 16, magnitude = u & 0x7fffu;
  const vec8u special = (vec8u)(magnitude >= 0x7c00u);  // all ones where infinite or NaN
  const vec8u normal = (magnitude << 13) + 0x38000000u + (special & 0x38000000u);
  const vec8 small_value = __builtin_convertvector((vec8i)magnitude, vec8) * 0x1p-24f;
  const vec8u small = (vec8u)small_value;  // its bits
  const vec8u is_small = (vec8u)(magnitude < 0x0400u);
  return as_floats(sign | (small & is_small) | (normal & ~is_small));
#endif
}

inline __attribute__((always_inline)) float widen_bf16(uint16_t half) {
  vec8h one = {half};
  return load8_bf16(reinterpret_cast<const uint16_t*>(&one))[0];
}

inline __attribute__((always_inline)) float widen_f16(uint16_t half) {
  vec8h one = {half};
  return load8_f16(reinterpret_cast<const uint16_t*>(&one))[0];
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
