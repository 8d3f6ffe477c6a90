// Loads and stores of 16-bit storage through float, for every CUDA pass (SPEC: fp16/bf16 compute
// and accumulate in fp32). Included only by .cu files.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "engine/step_args.h"

namespace rnnattn {

// 16-bit storage computes in float (SPEC: fp16/bf16 accumulate in fp32).
template <>
struct ScalarIO<f16_t> {
  using Acc = float;
  __host__ __device__ __forceinline__ static float load(f16_t v) {
    return __half2float(__ushort_as_half(v.bits));
  }
  __host__ __device__ __forceinline__ static f16_t store(float v) {
    return f16_t{__half_as_ushort(__float2half_rn(v))};
  }
};

template <>
struct ScalarIO<bf16_t> {
  using Acc = float;
  __host__ __device__ __forceinline__ static float load(bf16_t v) {
    return __bfloat162float(__ushort_as_bfloat16(v.bits));
  }
  __host__ __device__ __forceinline__ static bf16_t store(float v) {
    return bf16_t{__bfloat16_as_ushort(__float2bfloat16_rn(v))};
  }
};

}  // namespace rnnattn
