// The pointwise passes on the CPU, over a range of units [begin, end) of the B*H units of a step.
// Implemented twice (baseline x86-64 and AVX2+FMA) from one source; the caller picks at run time.
#pragma once
#include <cstdint>

#include "engine/step_args.h"

namespace rnnattn::cpu {

template <class Cell, typename T>
using ForwardRangeFn = void (*)(const ForwardStepArgs<T>&, int64_t begin, int64_t end);
template <class Cell, typename T>
using BackwardRangeFn = void (*)(const BackwardStepArgs<T>&, int64_t begin, int64_t end);

#define RNNATTN_DECLARE_CPU_POINTWISE(ns)                                                   \
  namespace ns {                                                                            \
  template <class Cell, typename T>                                                         \
  void forward_range(const ForwardStepArgs<T>& args, int64_t begin, int64_t end);          \
  template <class Cell, typename T>                                                         \
  void backward_range(const BackwardStepArgs<T>& args, int64_t begin, int64_t end);        \
  }
RNNATTN_DECLARE_CPU_POINTWISE(baseline)
RNNATTN_DECLARE_CPU_POINTWISE(avx2)
#undef RNNATTN_DECLARE_CPU_POINTWISE

bool has_avx2_fma();

template <class Cell, typename T>
ForwardRangeFn<Cell, T> forward_range_fn() {
  static const ForwardRangeFn<Cell, T> fn =
      has_avx2_fma() ? &avx2::forward_range<Cell, T> : &baseline::forward_range<Cell, T>;
  return fn;
}

template <class Cell, typename T>
BackwardRangeFn<Cell, T> backward_range_fn() {
  static const BackwardRangeFn<Cell, T> fn =
      has_avx2_fma() ? &avx2::backward_range<Cell, T> : &baseline::backward_range<Cell, T>;
  return fn;
}

}  // namespace rnnattn::cpu
