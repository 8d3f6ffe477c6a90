// The vector attention passes for any CPU, and the run-time choice between the instruction sets.
#define RNNATTN_CPU_ISA baseline
#include "engine/cpu/attention_cpu_impl.h"

#include "engine/cpu/kernel_isa.h"

namespace rnnattn::cpu {

AttentionPassFn attention_forward_fn() {
  static const AttentionPassFn fn = has_avx2_fma() ? &avx2::attention_forward_pass : &baseline::attention_forward_pass;
  return fn;
}

AttentionPassFn attention_backward_fn() {
  static const AttentionPassFn fn =
      has_avx2_fma() ? &avx2::attention_backward_pass : &baseline::attention_backward_pass;
  return fn;
}

}  // namespace rnnattn::cpu
