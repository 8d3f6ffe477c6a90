#include "engine/reused_memory.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <pthread.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

namespace rnnattn {
namespace {

int64_t read_limit() {
  const char* text = std::getenv("RNNATTN_CPU_KEEP_MB");
  if (text == nullptr || text[0] == '\0') return int64_t{1024} << 20;
  char* end = nullptr;
  const long long mib = std::strtoll(text, &end, 10);
  TORCH_CHECK(*end == '\0' && mib >= 0 && mib <= (int64_t{1} << 30), "rnnattn: the environment variable ",
              "RNNATTN_CPU_KEEP_MB must be a non-negative integer (MiB of freed CPU output memory kept for reuse; ",
              "0 keeps none), got '", text, "'");
  return static_cast<int64_t>(mib) << 20;
}

// A block of the default CPU allocator's memory (so that memory profilers see it made and freed).
struct Block {
  c10::DataPtr memory;
  size_t capacity = 0;
};

// Hands out kept blocks of at least the size asked and at most a quarter more (a training loop asks
// for the same sizes every iteration; bucketed sequence lengths for a few sizes); a freed block is
// kept, the oldest let go first once more than the limit would be kept or when a new block is made.
class ReusingAllocator final : public c10::Allocator {
 public:
  // Never destroyed: tensors freed while the process exits still give their blocks back to it.
  static ReusingAllocator& instance() {
    static auto* allocator = new ReusingAllocator();
    return *allocator;
  }

  // A fork while another thread holds the lock would leave it locked for good in the child, whose
  // first large output would then wait forever: fork waits for the lock and the child gets it free
  // (as glibc's malloc does for its own). Registered when the allocator is made: before, no thread
  // can hold its lock.
  ReusingAllocator() { pthread_atfork(&lock_for_fork, &unlock_after_fork, &unlock_after_fork); }

  c10::DataPtr allocate(size_t bytes) override {
    std::vector<Block*> released;
    Block* block = take(bytes, released);
    for (Block* b : released) delete b;
    if (block == nullptr) block = new Block{c10::GetCPUAllocator()->allocate(bytes), bytes};
    return {block->memory.get(), block, &ReusingAllocator::give_back, c10::Device(c10::kCPU)};
  }
  void copy_data(void* dest, const void* src, size_t count) const override {
    if (count > 0) std::memcpy(dest, src, count);
  }

  int64_t kept() {
    const std::lock_guard<std::mutex> lock(mutex_);
    return static_cast<int64_t>(kept_bytes_);
  }
  // Holds the lock for `seconds` (tests: a fork meanwhile must not leave it held in the child).
  void hold_lock(double seconds) {
    TORCH_CHECK_VALUE(seconds >= 0 && seconds <= 60, "_hold_cpu_kept_memory_lock: seconds must be in [0, 60], got ",
                      seconds);
    const std::lock_guard<std::mutex> lock(mutex_);
    std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
  }
  void release() {
    std::vector<Block*> released;
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      released.swap(kept_);
      kept_bytes_ = 0;
    }
    for (Block* block : released) delete block;  // outside the lock: unmapping takes a while
  }

 private:
  // The smallest kept block that fits; none: the oldest kept blocks, at least `bytes` of them, go to
  // `released` (so that what is kept never adds to the process's peak: a new block replaces them).
  Block* take(size_t bytes, std::vector<Block*>& released) {
    const std::lock_guard<std::mutex> lock(mutex_);
    size_t best = kept_.size();
    for (size_t i = 0; i < kept_.size(); ++i) {
      const size_t capacity = kept_[i]->capacity;
      if (capacity >= bytes && capacity - bytes <= bytes / 4 &&
          (best == kept_.size() || capacity < kept_[best]->capacity)) {
        best = i;
      }
    }
    if (best == kept_.size()) {
      let_go_oldest(bytes, released);
      return nullptr;
    }
    Block* block = kept_[best];
    kept_.erase(kept_.begin() + static_cast<std::ptrdiff_t>(best));
    kept_bytes_ -= block->capacity;
    return block;
  }

  // Moves the oldest kept blocks, at least `bytes` of them (or all), to `released`; the lock held.
  void let_go_oldest(size_t bytes, std::vector<Block*>& released) {
    size_t freed = 0;
    while (freed < bytes && !kept_.empty()) {
      freed += kept_.front()->capacity;
      kept_bytes_ -= kept_.front()->capacity;
      released.push_back(kept_.front());
      kept_.erase(kept_.begin());
    }
  }

  static void lock_for_fork() { instance().mutex_.lock(); }
  static void unlock_after_fork() { instance().mutex_.unlock(); }

  // The DataPtr's deleter: the block goes back to the allocator, which outlives every tensor.
  static void give_back(void* context) {
    auto* block = static_cast<Block*>(context);
    const size_t limit = static_cast<size_t>(reused_memory_limit());
    std::vector<Block*> released;
    ReusingAllocator& self = instance();
    {
      const std::lock_guard<std::mutex> lock(self.mutex_);
      if (block->capacity > limit || block->capacity < static_cast<size_t>(kReusedMinBytes)) {
        released.push_back(block);  // (a small one came from a tensor resized down to it)
      } else {
        self.kept_.push_back(block);
        self.kept_bytes_ += block->capacity;
        if (self.kept_bytes_ > limit) self.let_go_oldest(self.kept_bytes_ - limit, released);
      }
    }
    for (Block* b : released) delete b;
  }

  std::mutex mutex_;
  std::vector<Block*> kept_;  // oldest first
  size_t kept_bytes_ = 0;
};

}  // namespace

int64_t reused_memory_limit() {
  static const int64_t limit = read_limit();  // a raise leaves it unread: the next call raises again
  return limit;
}

int64_t reused_memory_kept() { return ReusingAllocator::instance().kept(); }

void release_reused_memory() { ReusingAllocator::instance().release(); }

void hold_reused_memory_lock(double seconds) { ReusingAllocator::instance().hold_lock(seconds); }

at::Tensor reused_cpu_empty(at::IntArrayRef sizes, at::ScalarType dtype) {
  const size_t bytes = at::detail::computeStorageNbytesContiguous(sizes, c10::elementSize(dtype));
  if (bytes < static_cast<size_t>(kReusedMinBytes) || reused_memory_limit() == 0) {
    return at::detail::empty_cpu(sizes, dtype);
  }
  return at::detail::empty_generic(sizes, &ReusingAllocator::instance(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   dtype, std::nullopt);
}

}  // namespace rnnattn
