// Loops of the CPU pointwise passes. Included by one .cpp per instruction set, each of which
// defines RNNATTN_CPU_ISA to the namespace it fills (no torch headers here: the AVX2 file must
// not emit AVX2 copies of inline functions that other files share).
#pragma once
#include "cells/all_cells.h"
#include "engine/cpu/pointwise_cpu.h"

namespace rnnattn::cpu::RNNATTN_CPU_ISA {

// The inner loop runs over the units of one batch row so that it vectorizes.
template <class Cell, typename T, bool kSave, StepExtra kExtra>
void forward_block_impl(const ForwardStepArgs<T>& args) {
  for (int64_t b = args.row_begin, end = row_end(args); b < end; ++b) {
    if (!row_active(args, b)) {
      for (int64_t j = args.unit_begin; j < args.unit_end; ++j) hold_forward_unit<Cell, T>(args, b, j);
      continue;
    }
#pragma GCC ivdep
    for (int64_t j = args.unit_begin; j < args.unit_end; ++j) forward_unit<Cell, T, kSave, kExtra>(args, b, j);
  }
}

template <class Cell, typename T, bool kSave>
void forward_block_saving(const ForwardStepArgs<T>& args) {
  dispatch_step_extra(args, [&](auto extra) { forward_block_impl<Cell, T, kSave, decltype(extra)::value>(args); });
}

template <class Cell, typename T>
void forward_block(const ForwardStepArgs<T>& args) {
  args.saved != nullptr ? forward_block_saving<Cell, T, true>(args) : forward_block_saving<Cell, T, false>(args);
}

template <class Cell, typename T, bool kHiddenCopy>
void backward_block_impl(const BackwardStepArgs<T>& args) {
  for (int64_t b = args.row_begin, end = row_end(args); b < end; ++b) {
    if (!row_active(args, b)) {
      for (int64_t j = args.unit_begin; j < args.unit_end; ++j) hold_backward_unit<Cell, T, kHiddenCopy>(args, b, j);
      continue;
    }
#pragma GCC ivdep
    for (int64_t j = args.unit_begin; j < args.unit_end; ++j) backward_unit<Cell, T, kHiddenCopy>(args, b, j);
  }
}

template <class Cell, typename T>
void backward_block(const BackwardStepArgs<T>& args) {
  if (!Cell::kSeparateHiddenGrad && args.dhg.ptr != nullptr) {
    backward_block_impl<Cell, T, true>(args);
  } else {
    backward_block_impl<Cell, T, false>(args);
  }
}

#define RNNATTN_INSTANTIATE_CPU(CELL)                                              \
  template void forward_block<CELL, float>(const ForwardStepArgs<float>&);        \
  template void forward_block<CELL, double>(const ForwardStepArgs<double>&);      \
  template void backward_block<CELL, float>(const BackwardStepArgs<float>&);      \
  template void backward_block<CELL, double>(const BackwardStepArgs<double>&);
RNNATTN_FOR_EACH_CELL(RNNATTN_INSTANTIATE_CPU)
#undef RNNATTN_INSTANTIATE_CPU

}  // namespace rnnattn::cpu::RNNATTN_CPU_ISA
