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
// Maximum relative error of fast_exp is about 2 ulp; values past the float range saturate.
RNNATTN_HD float fast_exp(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;
  constexpr float kLn2Lo = -2.12194440e-4f;
  // Comparisons with NaN are false, so these clamps pass a NaN through unchanged.
  x = x < -87.3f ? -87.3f : x;
  x = x > 88.3f ? 88.3f : x;
  const float t = x * kLog2e;
  const int32_t n = static_cast<int32_t>(t + (t >= 0.f ? 0.5f : -0.5f));
  const float fn = static_cast<float>(n);
  const float r = (x - fn * kLn2Hi) - fn * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const int32_t bits = (n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

RNNATTN_HD float fast_tanh(float x) {
  // Small |x|: odd polynomial (no cancellation); large |x|: 1 - 2 / (exp(2|x|) + 1).
  const float ax = x < 0.f ? -x : x;
  const float z = x * x;
  float small = -5.70498872745e-3f;
  small = small * z + 2.06390887954e-2f;
  small = small * z - 5.37397155531e-2f;
  small = small * z + 1.33314422036e-1f;
  small = small * z - 3.33332819422e-1f;
  small = small * z * x + x;
  const float large_abs = 1.f - 2.f / (fast_exp(2.f * ax) + 1.f);
  const float large = x < 0.f ? -large_abs : large_abs;
  return ax < 0.625f ? small : large;
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
