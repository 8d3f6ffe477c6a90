// rnnattn_ext._C.run_layers and run_attention_layers: the modules' calls without the Python steps around the op
// (python_layer_call.cpp).
#pragma once
#include <pybind11/pybind11.h>

namespace rnnattn {

void define_layer_call(pybind11::module_& module);

}  // namespace rnnattn
