// _C.HybridAttentionStep: HybridStreamer's attention step on the CPU (python_hybrid_attention.cpp).
#pragma once
#include <pybind11/pybind11.h>

namespace rnnattn {

void define_hybrid_attention(pybind11::module_& module);

}  // namespace rnnattn
