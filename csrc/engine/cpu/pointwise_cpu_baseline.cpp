// Pointwise passes for any x86-64 (or other) CPU.
#define RNNATTN_CPU_ISA baseline
#include "engine/cpu/pointwise_cpu_impl.h"

namespace rnnattn::cpu {

bool has_avx2_fma() {
#if defined(__x86_64__) || defined(__i386__)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

}  // namespace rnnattn::cpu
