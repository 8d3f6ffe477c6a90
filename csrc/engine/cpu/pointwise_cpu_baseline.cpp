// Pointwise passes for any x86-64 (or other) CPU.
#define RNNATTN_CPU_ISA baseline
#include "engine/cpu/pointwise_cpu_impl.h"
