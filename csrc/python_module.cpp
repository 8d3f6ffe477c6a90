// The Python extension module rnnattn_ext._C. Loading it registers the ops (static initializers
// in csrc/ops); it also reports how the library was built, and runs the modules' calls
// (python_layer_call.cpp), makes streamers (python_streamer.cpp) and the hybrid block's streaming
// attention step (python_hybrid_attention.cpp).
#include <ATen/ATen.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <map>
#include <string>
#include <tuple>
#include <utility>

#include "cells/all_cells.h"
#include "engine/cpu/kernel_isa.h"
#include "engine/cpu/packed_gemm_bf16.h"
#include "engine/recurrent_engine.h"
#include "engine/reused_memory.h"
#include "engine/unit_blocks.h"
#include "engine/usable_cpus.h"
#include "python_hybrid_attention.h"
#include "python_layer_call.h"
#include "python_streamer.h"

namespace py = pybind11;

namespace {

// (gates, states, workspace planes per step) of every cell: the fake implementations read these
// so that the Python side never restates the cells' layout.
std::map<std::string, std::tuple<int, int, int>> cell_layouts() {
  std::map<std::string, std::tuple<int, int, int>> layouts;
#define RNNATTN_CELL_LAYOUT(CELL) \
  layouts[CELL::kName] = {CELL::kGates, CELL::kStates, ::rnnattn::workspace_planes<CELL>()};
  RNNATTN_FOR_EACH_CELL(RNNATTN_CELL_LAYOUT)
#undef RNNATTN_CELL_LAYOUT
  return layouts;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "rnnattn_ext compiled library: registers the torch.ops.rnnattn operators";
  m.def("cell_layouts", &cell_layouts);
  m.attr("built_with_torch") = RNNATTN_TORCH_VERSION;
  m.def("cpu_kernels", [] { return ::rnnattn::cpu::kernel_isa_name(::rnnattn::cpu::kernel_isa()); },
        "Which build of the CPU kernels runs: avx512 (the packed GEMM's AVX-512 build, the others' AVX2+FMA "
        "one), avx2 (AVX2+FMA+F16C) or baseline (any x86-64); RNNATTN_CPU_KERNELS picks one");
  m.def("cpu_bf16_products", &::rnnattn::cpu::bf16_products_available,
        "Whether a bfloat16 layer's products on the CPU run in bfloat16 (AVX512-BF16 and the avx512 kernels), "
        "else in float32");
  m.def("cpu_kept_bytes", &::rnnattn::reused_memory_kept,
        "Bytes of freed CPU output memory kept for reuse by later calls (at most RNNATTN_CPU_KEEP_MB MiB)");
  m.def("release_cpu_kept_memory", &::rnnattn::release_reused_memory,
        "Hands the freed CPU output memory kept for reuse back to the system");
  m.def("_hold_cpu_kept_memory_lock", &::rnnattn::hold_reused_memory_lock, py::arg("seconds"),
        py::call_guard<py::gil_scoped_release>(),
        "Tests only: holds the lock of the kept CPU output memory for `seconds` (the GIL released), so that a "
        "test can fork meanwhile");
  m.def("usable_cpus", &::rnnattn::usable_cpus,
        "CPUs this process can keep busy at once (affinity mask, cgroup CPU quota): a CPU layer runs on at most "
        "this many threads, and at most torch.get_num_threads()");
  m.def(
      "cpu_loop_split",
      [](int gates, int64_t hidden, int64_t rows, int64_t steps, bool backward, bool rows_independent,
         int64_t attention_rows) {
        const auto split = ::rnnattn::cpu_loop_split(
            gates, hidden, hidden, rows, steps, backward ? ::rnnattn::LoopPass::backward : ::rnnattn::LoopPass::forward,
            at::empty({0}), attention_rows > 0 ? 1 : 0, attention_rows, 1, rows_independent);
        return std::make_pair(split.unit_blocks, split.row_blocks);
      },
      py::arg("gates"), py::arg("hidden"), py::arg("rows"), py::arg("steps"), py::arg("backward"),
      py::arg("rows_independent"), py::arg("attention_rows") = 0,
      "(unit blocks, row blocks): how a CPU time loop of `steps` steps over `rows` batch rows of a layer of `gates` "
      "gates of `hidden` units (and, for the attention cell, `attention_rows` more rows of recurrent weight: "
      "3 * num_heads * head_dim with self memory, else num_heads * head_dim) shares its work among threads "
      "(unit_blocks.h); RNNATTN_CPU_MIN_BLOCK_WORK sets how much a thread must get");
  ::rnnattn::define_layer_call(m);
  ::rnnattn::define_streamer(m);
  ::rnnattn::define_hybrid_attention(m);
#ifdef RNNATTN_WITH_CUDA
  m.attr("cuda_built") = true;
  m.attr("cuda_version") = RNNATTN_CUDA_VERSION;
  m.attr("cuda_architectures") = RNNATTN_CUDA_ARCHS;
#else
  m.attr("cuda_built") = false;
  m.attr("cuda_version") = py::none();
  m.attr("cuda_architectures") = "";
#endif
}
