// Scalar math shared by every cell, compiled by g++ for the CPU and by nvcc for the GPU.
// Header-only and free of torch so that .cu files stay fast to compile.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define RNNATTN_HD __host__ __device__ __forceinline__
#define RNNATTN_UNROLL _Pragma("unroll")
#else
#define RNNATTN_HD inline __attribute__((always_inline))
#define RNNATTN_UNROLL _Pragma("GCC unroll 8")
#endif

namespace rnnattn::math {

#if !defined(__CUDA_ARCH__)
// Host float path: branch-free polynomial exp and tanh so that GCC vectorizes the pointwise loops.
// Maximum relative error about 2 ulp; values past the float range saturate; NaN passes through.

// e^x as 2^n (1 + m) with x = n ln2 + r, |r| <= ln2 / 2 and m = e^r - 1 a polynomial that never forms
// 1 + r (so e^x - 1 stays accurate near 0). x must lie in [-87.3, 88.3]: 2^n is then a normal float.
struct ExpParts {
  float scale;  // 2^n
  float m;      // e^r - 1
};

RNNATTN_HD ExpParts exp_parts(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kRound = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer (ties to even)
  constexpr int32_t kRoundBits = 0x4B400000;
  const float shifted = x * kLog2e + kRound;  // n in the low bits of the mantissa
  const float fn = shifted - kRound;
  int32_t n;
  std::memcpy(&n, &shifted, sizeof(n));
  n -= kRoundBits;
  const float r = (x - fn * kLn2Hi) - fn * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const int32_t bits = (n + 127) << 23;
  ExpParts parts;
  std::memcpy(&parts.scale, &bits, sizeof(parts.scale));
  parts.m = p * (r * r) + r;
  return parts;
}

// Comparisons with NaN are false, so the clamps below pass a NaN through unchanged. Past the float
// range the result is +inf, as expf's: sigmoid(-inf) is then exactly 0, and 0 * inf stays NaN
// downstream as it does in torch.
RNNATTN_HD float fast_exp(float x) {
  float clamped = x < -87.3f ? -87.3f : x;
  clamped = clamped > 88.3f ? 88.3f : clamped;
  const ExpParts e = exp_parts(clamped);
  const float value = (e.m + 1.f) * e.scale;
  return x > 88.7228394f ? INFINITY : value;
}

// e^x - 1 for x <= 0, accurate near 0: 2^n m + (2^n - 1).
RNNATTN_HD float expm1_nonpositive(float x) {
  x = x < -87.3f ? -87.3f : x;
  const ExpParts e = exp_parts(x);
  return e.scale * e.m + (e.scale - 1.f);
}

// tanh |x| = -m / (2 + m) with m = e^(-2|x|) - 1: one exponential, one division, and no cancellation
// near 0 (m is accurate there).
RNNATTN_HD float fast_tanh(float x) {
  const float ax = x < 0.f ? -x : x;
  const float m = expm1_nonpositive(-2.f * ax);
  const float t = -m / (2.f + m);
  return x < 0.f ? -t : t;
}
#endif

RNNATTN_HD float sigmoid(float x) {
#if defined(__CUDA_ARCH__)
  return 1.f / (1.f + expf(-x));
#else
  return 1.f / (1.f + fast_exp(-x));
#endif
}

RNNATTN_HD double sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }

RNNATTN_HD float tanh_(float x) {
#if defined(__CUDA_ARCH__)
  return tanhf(x);
#else
  return fast_tanh(x);
#endif
}

RNNATTN_HD double tanh_(double x) { return tanh(x); }

template <typename A>
RNNATTN_HD A relu(A x) {
  // x > 0 ? x : 0 would turn NaN into 0; keep NaN like torch.relu.
  return x < A(0) ? A(0) : x;
}

}  // namespace rnnattn::math
