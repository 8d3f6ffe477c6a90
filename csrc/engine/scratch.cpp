#include "engine/scratch.h"

#include <ATen/ATen.h>

#include <algorithm>

namespace rnnattn {
namespace {

// The most a thread keeps between calls; a call that needs more allocates the rest per call.
constexpr int64_t kMaxArenaBytes = 64ll << 20;
constexpr int64_t kAlignment = 64;

struct Arena {
  at::Tensor block;  // uint8, CPU
  int64_t wanted = 0;
  bool busy = false;
};

Arena& thread_arena() {
  thread_local Arena arena;
  return arena;
}

}  // namespace

CallScratch::CallScratch(const at::Tensor& like) : options_(like.options()) {
  Arena& arena = thread_arena();
  if (!like.is_cpu() || arena.busy) return;
  arena.busy = true;
  uses_arena_ = true;
  const int64_t size = std::min(arena.wanted, kMaxArenaBytes);
  if (!arena.block.defined() || arena.block.numel() < size) {
    arena.block = at::Tensor();  // free the old block first
    arena.block = at::empty({size}, at::TensorOptions().dtype(at::kByte));
  }
}

CallScratch::~CallScratch() {
  if (!uses_arena_) return;
  Arena& arena = thread_arena();
  arena.wanted = std::max(arena.wanted, wanted_);
  arena.busy = false;
}

void* CallScratch::take(int64_t bytes) {
  bytes = (bytes + kAlignment - 1) / kAlignment * kAlignment;
  wanted_ += bytes;
  const Arena& arena = thread_arena();
  if (uses_arena_ && used_ + bytes <= arena.block.numel()) {
    void* p = static_cast<uint8_t*>(arena.block.data_ptr()) + used_;
    used_ += bytes;
    return p;
  }
  overflow_.push_back(at::empty({bytes}, options_.dtype(at::kByte)));
  return overflow_.back().data_ptr();
}

at::Tensor CallScratch::empty(at::IntArrayRef sizes) {
  if (!uses_arena_) return at::empty(sizes, options_);
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  return at::from_blob(take(numel * options_.dtype().itemsize()), sizes, options_);
}

at::Tensor CallScratch::zeros(at::IntArrayRef sizes) {
  if (!uses_arena_) return at::zeros(sizes, options_);
  return empty(sizes).zero_();
}

float* CallScratch::floats(int64_t count) { return static_cast<float*>(take(count * int64_t(sizeof(float)))); }

}  // namespace rnnattn
