// Pointwise passes compiled with -mavx2 -mfma -mavx512f (see CMakeLists.txt); chosen only on CPUs that
// have AVX-512F. The loops are the same scalar code per unit, vectorized 16 units at a time instead
// of 8: every unit's result is bitwise that of the AVX2 build (no sum crosses units).
#define RNNATTN_CPU_ISA avx512
#include "engine/cpu/pointwise_cpu_impl.h"
