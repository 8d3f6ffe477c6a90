// The packed GEMM compiled with -mavx2 -mfma (see CMakeLists.txt); chosen only on CPUs that have both.
#define RNNATTN_CPU_ISA avx2
#include "engine/cpu/packed_gemm_impl.h"
