// Temporary buffers of one engine call. On the CPU they are carved from a block of memory that the
// calling thread keeps between calls: a fresh multi-MiB allocation per call is page-faulted in and
// handed back to the system on free (glibc trims it), which costs more than the whole time loop of a
// short sequence. Other devices allocate normally (their allocators cache). A buffer from here must
// not outlive the call: never return one as an op's output.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace rnnattn {

class CallScratch {
 public:
  explicit CallScratch(const at::Tensor& like);
  ~CallScratch();
  CallScratch(const CallScratch&) = delete;
  CallScratch& operator=(const CallScratch&) = delete;

  const at::TensorOptions& options() const { return options_; }
  // Uninitialised, of like's dtype and device.
  at::Tensor empty(at::IntArrayRef sizes);
  at::Tensor zeros(at::IntArrayRef sizes);
  // count floats for the packed GEMM's panels (CPU).
  float* floats(int64_t count);
  // count row addresses of a matrix our CPU kernels read (cpu/packed_gemm.h): float rows, or the
  // 16-bit float rows of a cpu::Rows16Matrix (Element uint16_t).
  template <typename Element = float>
  const Element** row_addresses(int64_t count) {
    return static_cast<const Element**>(take(count * int64_t(sizeof(const Element*))));
  }

 private:
  void* take(int64_t bytes);
  at::TensorOptions options_;
  bool uses_arena_ = false;  // false: another call on this thread holds the arena, or not the CPU
  int64_t used_ = 0;         // bytes taken from the arena
  int64_t wanted_ = 0;       // bytes this call would have taken: the arena's size next time
  std::vector<at::Tensor> overflow_;  // what did not fit, allocated on its own
};

}  // namespace rnnattn
