// Tensors across the Python boundary of _C's classes and functions, which read the data directly.
#pragma once
#include <pybind11/pybind11.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

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

// The Python tensor of `tensor`; None for an undefined one.
inline pybind11::object wrap(at::Tensor tensor) {
  if (!tensor.defined()) return pybind11::none();
  return pybind11::reinterpret_steal<pybind11::object>(THPVariable_Wrap(std::move(tensor)));
}

}  // namespace rnnattn
