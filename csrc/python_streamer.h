// rnnattn_ext.Streamer: a module's layers, one time step per call, the state kept inside
// (python_streamer.cpp).
#pragma once
#include <pybind11/pybind11.h>

namespace rnnattn {

void define_streamer(pybind11::module_& module);

}  // namespace rnnattn
