# Finds Python, pybind11 and the torch installed in that Python, and defines the interface
# targets rnnattn_torch (CPU libraries) and rnnattn_torch_cuda (CUDA libraries, if any).
# torch's own TorchConfig.cmake is not used: with a CUDA build of torch it insists on finding
# cuDNN-era CUDA variables that a pip install does not provide. Headers and libraries are taken
# from the torch package itself instead.

find_package(Python 3.9 REQUIRED COMPONENTS Interpreter Development.Module)

execute_process(
  COMMAND "${Python_EXECUTABLE}" -c "import pybind11; print(pybind11.get_cmake_dir())"
  OUTPUT_VARIABLE _pybind11_dir OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _rc)
if(NOT _rc EQUAL 0)
  message(FATAL_ERROR "pybind11 is not installed in ${Python_EXECUTABLE}: pip install pybind11")
endif()
find_package(pybind11 CONFIG REQUIRED PATHS "${_pybind11_dir}" NO_DEFAULT_PATH)

execute_process(
  COMMAND "${Python_EXECUTABLE}" -c
"import os, torch
root = os.path.dirname(torch.__file__)
print(torch.__version__)
print(os.path.join(root, 'include'))
print(os.path.join(root, 'lib'))
print(int(torch._C._GLIBCXX_USE_CXX11_ABI))
print(torch.version.cuda or '')
nvidia = os.path.join(os.path.dirname(root), 'nvidia')
print(';'.join(os.path.join(nvidia, d, 'include') for d in sorted(os.listdir(nvidia)) if os.path.isdir(os.path.join(nvidia, d, 'include'))) if os.path.isdir(nvidia) else '')"
  OUTPUT_VARIABLE _torch_info RESULT_VARIABLE _rc)
if(NOT _rc EQUAL 0)
  message(FATAL_ERROR "torch is not importable from ${Python_EXECUTABLE}. Install torch first, then build "
                      "with `pip install --no-build-isolation .` so that the build sees that torch.")
endif()
string(STRIP "${_torch_info}" _torch_info)
string(REPLACE "\n" ";" _torch_info "${_torch_info}")
list(GET _torch_info 0 RNNATTN_TORCH_VERSION)
list(GET _torch_info 1 _torch_include)
list(GET _torch_info 2 _torch_lib)
list(GET _torch_info 3 _torch_cxx11_abi)
list(LENGTH _torch_info _n)
set(RNNATTN_TORCH_CUDA "")
set(RNNATTN_TORCH_NVIDIA_INCLUDES "")
if(_n GREATER 4)
  list(GET _torch_info 4 RNNATTN_TORCH_CUDA)
endif()
if(_n GREATER 5)
  list(SUBLIST _torch_info 5 -1 RNNATTN_TORCH_NVIDIA_INCLUDES)
endif()
message(STATUS "rnnattn_ext: building against torch ${RNNATTN_TORCH_VERSION} (${_torch_include})")

function(_rnnattn_torch_library out name)
  find_library(${out} NAMES ${name} PATHS "${_torch_lib}" NO_DEFAULT_PATH REQUIRED)
endfunction()
_rnnattn_torch_library(_c10 c10)
_rnnattn_torch_library(_torch_cpu torch_cpu)

add_library(rnnattn_torch INTERFACE)
target_include_directories(rnnattn_torch SYSTEM INTERFACE "${_torch_include}"
                           "${_torch_include}/torch/csrc/api/include")
target_compile_definitions(rnnattn_torch INTERFACE _GLIBCXX_USE_CXX11_ABI=${_torch_cxx11_abi})
target_link_libraries(rnnattn_torch INTERFACE ${_c10} ${_torch_cpu})

# torch's Python bindings: rnnattn_ext._C.run_one_layer takes and returns Python tensors. Their
# headers are written against the pybind11 that torch ships in its include directory, so the module
# compiles against that copy (RNNATTN_TORCH_INCLUDE goes before pybind11's own headers); the
# pybind11 package supplies the CMake functions.
set(RNNATTN_TORCH_INCLUDE "${_torch_include}")
_rnnattn_torch_library(_torch_python torch_python)
add_library(rnnattn_torch_python INTERFACE)
target_link_libraries(rnnattn_torch_python INTERFACE rnnattn_torch ${_torch_python})
