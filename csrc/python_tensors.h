// Tensors across the Python boundary of _C's classes and functions, which read the data directly.
#pragma once
#include <ATen/PythonTorchFunctionTLS.h>
#include <pybind11/pybind11.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/frontend/tracer.h>

#include <string>
#include <utility>

namespace rnnattn {

// A tensor argument: a torch.Tensor (a Parameter too), not a subclass, which could hold no data
// (FakeTensor) or expect its own dispatch.
inline const at::Tensor& exact_tensor(pybind11::handle object, const char* where, const std::string& name) {
  TORCH_CHECK_TYPE(THPVariable_Check(object.ptr()), where, ": ", name, " must be a torch.Tensor, got ",
                   Py_TYPE(object.ptr())->tp_name);
  TORCH_CHECK_TYPE(THPVariable_CheckExact(object.ptr()), where, ": ", name,
                   " must be a plain torch.Tensor (the streamer calls the engine directly), got the subclass ",
                   Py_TYPE(object.ptr())->tp_name, "; call the module instead");
  return THPVariable_Unpack(object.ptr());
}

// A plain tensor (or Parameter), whose call torch.ops would not hand to a __torch_function__; null
// for anything else (the caller then leaves the call to its Python path).
inline const at::Tensor* plain_tensor(pybind11::handle object) {
  return THPVariable_CheckExact(object.ptr()) ? &THPVariable_Unpack(object.ptr()) : nullptr;
}

// Whether torch.ops would run an op as it is: no __torch_function__ mode to hand it to, and no
// torch.jit.trace (which would record the caller's sizes as constants).
inline bool plain_call() { return !at::impl::torch_function_mode_enabled() && !torch::jit::tracer::isTracing(); }

// The Python tensor of `tensor`; None for an undefined one.
inline pybind11::object wrap(at::Tensor tensor) {
  if (!tensor.defined()) return pybind11::none();
  return pybind11::reinterpret_steal<pybind11::object>(THPVariable_Wrap(std::move(tensor)));
}

}  // namespace rnnattn
