// The packed GEMM compiled with -mavx2 -mfma -mavx512f (see CMakeLists.txt); chosen only on CPUs that
// have AVX-512F (which implies AVX2 and FMA). Its products of 2 rows or more keep a panel in one
// 16-float register; their results are bitwise those of the AVX2 build.
#define RNNATTN_CPU_ISA avx512
#include "engine/cpu/packed_gemm_impl.h"
