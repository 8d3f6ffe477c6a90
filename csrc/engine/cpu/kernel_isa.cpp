#include "engine/cpu/kernel_isa.h"

#include "engine/cpu/packed_gemm_bf16.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string_view>

namespace rnnattn::cpu {
namespace {

// The best build this CPU runs (the OS must save the wider registers too: GCC's check includes it).
// Both x86 builds use F16C too (float16 weights read in place), which every CPU with AVX2 has.
KernelIsa supported_isa() {
#if defined(__x86_64__) || defined(__i386__)
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (avx2 && __builtin_cpu_supports("avx512f")) return KernelIsa::avx512;
  if (avx2) return KernelIsa::avx2;
#endif
  return KernelIsa::baseline;
}

KernelIsa chosen_isa() {
  const char* value = std::getenv("RNNATTN_CPU_KERNELS");
  const std::string_view name = value == nullptr || value[0] == '\0' ? "auto" : value;
  const KernelIsa supported = supported_isa();
  if (name == "auto") return supported;
  for (const KernelIsa isa : {KernelIsa::baseline, KernelIsa::avx2, KernelIsa::avx512}) {
    if (name != kernel_isa_name(isa)) continue;
    TORCH_CHECK(isa <= supported, "rnnattn: RNNATTN_CPU_KERNELS=", name, ", but this CPU runs at most the ",
                kernel_isa_name(supported), " build of the CPU kernels");
    return isa;
  }
  TORCH_CHECK(false, "rnnattn: the environment variable RNNATTN_CPU_KERNELS must be auto, baseline, avx2 or avx512, got '",
              name, "'");
}

}  // namespace

const char* kernel_isa_name(KernelIsa isa) {
  switch (isa) {
    case KernelIsa::avx512: return "avx512";
    case KernelIsa::avx2: return "avx2";
    default: return "baseline";
  }
}

bool has_avx2_fma() { return kernel_isa() >= KernelIsa::avx2; }

bool bf16_products_available() {
#if (defined(__x86_64__) || defined(__i386__)) && defined(RNNATTN_HAVE_AVX512BF16)
  static const bool available = kernel_isa() == KernelIsa::avx512 && __builtin_cpu_supports("avx512bf16");
  return available;
#else
  return false;
#endif
}

KernelIsa kernel_isa() {
  static const KernelIsa isa = chosen_isa();  // a raise leaves it undecided: the next call raises again
  return isa;
}

}  // namespace rnnattn::cpu
