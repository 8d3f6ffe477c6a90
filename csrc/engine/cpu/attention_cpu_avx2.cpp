// The vector attention passes compiled with -mavx2 -mfma (see CMakeLists.txt); chosen only on CPUs
// that have both.
#define RNNATTN_CPU_ISA avx2
#include "engine/cpu/attention_cpu_impl.h"
