// Which build of the CPU kernels a process runs, decided once: the best the CPU supports, or the one
// RNNATTN_CPU_KERNELS names (for tests and measurements). Every kernel has a baseline and an
// AVX2+FMA(+F16C) build; the packed GEMM and the pointwise passes also an AVX-512 one (the AVX-512 choice
// runs the AVX2+FMA build of the attention passes and of the in-place product).
#pragma once

namespace rnnattn::cpu {

enum class KernelIsa { baseline = 0, avx2 = 1, avx512 = 2 };

// Raises (naming the variable, what it may be and what it was) for a value other than auto,
// baseline, avx2 or avx512, or for a build this CPU cannot run.
KernelIsa kernel_isa();

const char* kernel_isa_name(KernelIsa isa);

// Whether the pointwise and attention passes run their AVX2+FMA build (an out-of-line function: an
// inline one could be emitted by a file built for a wider instruction set and chosen by the linker).
bool has_avx2_fma();

}  // namespace rnnattn::cpu
