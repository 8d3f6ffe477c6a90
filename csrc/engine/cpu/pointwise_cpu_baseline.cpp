// Pointwise passes for any x86-64 (or other) CPU.
#define RNNATTN_CPU_ISA baseline
#include "engine/cpu/pointwise_cpu_impl.h"

#include <cstdlib>
#include <cstring>

namespace rnnattn::cpu {

bool has_avx2_fma() {
  static const bool value = [] {
    // RNNATTN_CPU_BASELINE=1 takes the baseline kernels on any CPU (so that the tests run them too).
    const char* baseline = std::getenv("RNNATTN_CPU_BASELINE");
    if (baseline != nullptr && baseline[0] != '\0' && std::strcmp(baseline, "0") != 0) return false;
#if defined(__x86_64__) || defined(__i386__)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return false;
#endif
  }();
  return value;
}

}  // namespace rnnattn::cpu
