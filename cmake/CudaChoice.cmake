# Decides whether the CUDA kernels are built (RNNATTN_WITH_CUDA) from RNNATTN_CUDA (AUTO, ON, OFF),
# the installed torch and the presence of nvcc, and prints the choice with its reason.

set(RNNATTN_WITH_CUDA OFF)
set(_reason "")
string(TOUPPER "${RNNATTN_CUDA}" _mode)
if(NOT _mode MATCHES "^(AUTO|ON|OFF)$")
  message(FATAL_ERROR "RNNATTN_CUDA must be AUTO, ON or OFF, got '${RNNATTN_CUDA}'")
endif()

if(_mode STREQUAL "OFF")
  set(_reason "RNNATTN_CUDA=OFF")
elseif(RNNATTN_TORCH_CUDA STREQUAL "")
  set(_reason "the installed torch ${RNNATTN_TORCH_VERSION} is a CPU-only build")
else()
  include(CheckLanguage)
  check_language(CUDA)
  if(NOT CMAKE_CUDA_COMPILER)
    set(_reason "no CUDA compiler found (put nvcc on PATH or set CUDACXX / CUDA_HOME)")
  else()
    set(RNNATTN_WITH_CUDA ON)
  endif()
endif()

if(NOT RNNATTN_WITH_CUDA)
  if(_mode STREQUAL "ON")
    message(FATAL_ERROR "RNNATTN_CUDA=ON but CUDA cannot be built: ${_reason}")
  endif()
  message(STATUS "rnnattn_ext: CUDA kernels OFF: ${_reason}")
  return()
endif()

if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES OR CMAKE_CUDA_ARCHITECTURES STREQUAL "")
  set(CMAKE_CUDA_ARCHITECTURES "${RNNATTN_CUDA_ARCHS}")
endif()
set(CMAKE_CUDA_STANDARD 17)
set(CMAKE_CUDA_STANDARD_REQUIRED ON)
set(CMAKE_CUDA_RUNTIME_LIBRARY Shared)  # the same libcudart torch loads
enable_language(CUDA)
find_package(CUDAToolkit REQUIRED)

_rnnattn_torch_library(_c10_cuda c10_cuda)
_rnnattn_torch_library(_torch_cuda torch_cuda)
add_library(rnnattn_torch_cuda INTERFACE)
# The .cpp files that talk to CUDA include c10/cuda headers, cuBLAS and ATen's cuBLAS handle (the
# cuBLAS headers come with torch's own nvidia packages when the toolkit lacks them).
target_include_directories(rnnattn_torch_cuda SYSTEM INTERFACE ${CUDAToolkit_INCLUDE_DIRS}
                           ${RNNATTN_TORCH_NVIDIA_INCLUDES})
# cuBLAS, called directly for the per-step products: the library torch itself loads (same soname),
# from torch's nvidia packages or the toolkit.
string(REPLACE "/include" "/lib" _nvidia_libs "${RNNATTN_TORCH_NVIDIA_INCLUDES}")
find_library(RNNATTN_CUBLAS NAMES cublas libcublas.so.${CUDAToolkit_VERSION_MAJOR}
             PATHS ${_nvidia_libs} ${CUDAToolkit_LIBRARY_DIR} NO_DEFAULT_PATH)
if(NOT RNNATTN_CUBLAS)
  find_library(RNNATTN_CUBLAS NAMES cublas libcublas.so.${CUDAToolkit_VERSION_MAJOR})
endif()
if(NOT RNNATTN_CUBLAS)
  message(FATAL_ERROR "rnnattn_ext: no libcublas found beside torch (${_nvidia_libs}) or in the CUDA toolkit "
                      "(${CUDAToolkit_LIBRARY_DIR}); install the CUDA toolkit's cuBLAS, or build without CUDA "
                      "(RNNATTN_CUDA=OFF)")
endif()
target_link_libraries(rnnattn_torch_cuda INTERFACE ${_c10_cuda} ${_torch_cuda} ${RNNATTN_CUBLAS})
message(STATUS "rnnattn_ext: CUDA kernels ON: nvcc ${CMAKE_CUDA_COMPILER_VERSION}, torch built with CUDA "
               "${RNNATTN_TORCH_CUDA}, architectures ${CMAKE_CUDA_ARCHITECTURES}")
