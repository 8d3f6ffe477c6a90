// Loops of the CPU pointwise passes. Included by one .cpp per instruction set, each of which
// defines RNNATTN_CPU_ISA to the namespace it fills (no torch headers here: the AVX2 file must
// not emit AVX2 copies of inline functions that other files share).
#pragma once
#include "cells/all_cells.h"
#include "engine/cpu/pointwise_cpu.h"

namespace rnnattn::cpu::RNNATTN_CPU_ISA {

// Units are flattened as u = b*H + j; the inner loop runs over j so that it vectorizes.
template <class Cell, typename T, bool kSave>
void forward_range_impl(const ForwardStepArgs<T>& args, int64_t begin, int64_t end) {
  const int64_t H = args.hidden;
  for (int64_t b = begin / H; b * H < end; ++b) {
    const int64_t j0 = begin > b * H ? begin - b * H : 0;
    const int64_t j1 = end < (b + 1) * H ? end - b * H : H;
#pragma GCC ivdep
    for (int64_t j = j0; j < j1; ++j) forward_unit<Cell, T, kSave>(args, b, j);
  }
}

template <class Cell, typename T>
void forward_range(const ForwardStepArgs<T>& args, int64_t begin, int64_t end) {
  if (args.saved != nullptr) {
    forward_range_impl<Cell, T, true>(args, begin, end);
  } else {
    forward_range_impl<Cell, T, false>(args, begin, end);
  }
}

template <class Cell, typename T>
void backward_range(const BackwardStepArgs<T>& args, int64_t begin, int64_t end) {
  const int64_t H = args.hidden;
  for (int64_t b = begin / H; b * H < end; ++b) {
    const int64_t j0 = begin > b * H ? begin - b * H : 0;
    const int64_t j1 = end < (b + 1) * H ? end - b * H : H;
#pragma GCC ivdep
    for (int64_t j = j0; j < j1; ++j) backward_unit<Cell, T>(args, b, j);
  }
}

#define RNNATTN_INSTANTIATE_CPU(CELL)                                                              \
  template void forward_range<CELL, float>(const ForwardStepArgs<float>&, int64_t, int64_t);      \
  template void forward_range<CELL, double>(const ForwardStepArgs<double>&, int64_t, int64_t);    \
  template void backward_range<CELL, float>(const BackwardStepArgs<float>&, int64_t, int64_t);    \
  template void backward_range<CELL, double>(const BackwardStepArgs<double>&, int64_t, int64_t);
RNNATTN_FOR_EACH_CELL(RNNATTN_INSTANTIATE_CPU)
#undef RNNATTN_INSTANTIATE_CPU

}  // namespace rnnattn::cpu::RNNATTN_CPU_ISA
