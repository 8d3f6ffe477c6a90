#include "engine/thread_team.h"

#include <ATen/ThreadLocalState.h>

#include <exception>
#include <mutex>
#include <optional>
#include <thread>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace rnnattn {
namespace {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// Spins this long before yielding the core: a step is microseconds, but a team larger than the
// free cores must not starve the member it waits for.
constexpr int kSpinsBeforeYield = 4096;

}  // namespace

int64_t TeamBarrier::arrive(int64_t members) {
  // The generation this meeting ends: a member reaches its next meeting only after this one's end,
  // which the last member to arrive marks (after resetting the count for the next).
  const int64_t generation = generation_.load(std::memory_order_acquire);
  if (arrived_.fetch_add(1, std::memory_order_acq_rel) == members - 1) {
    arrived_.store(0, std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_acq_rel);
  }
  return generation;
}

bool TeamBarrier::wait_for(int64_t generation) {
  for (int spins = 0; generation_.load(std::memory_order_acquire) == generation; ++spins) {
    if (failed()) return false;
    if (spins < kSpinsBeforeYield) {
      cpu_relax();
    } else {
      std::this_thread::yield();
    }
  }
  return !failed();
}

void run_team(int64_t blocks, bool aten_state, const std::function<void(const TeamMember&)>& body) {
  if (blocks <= 1) {
    TeamMember solo;
    solo.blocks = blocks;
    body(solo);
    return;
  }
  std::optional<at::ThreadLocalState> caller_state;
  if (aten_state) caller_state.emplace();
  std::exception_ptr error;
  std::mutex error_mutex;
#ifdef _OPENMP
  const int requested = static_cast<int>(blocks);
  // OpenMP may give fewer threads than requested: each member passes the team's real size to the
  // barrier's waits (a barrier sized inside the region would cost every call one more meeting).
  TeamBarrier barrier;
#pragma omp parallel num_threads(requested)
  {
    TeamMember member;
    member.index = omp_get_thread_num();
    member.members = omp_get_num_threads();
    member.blocks = blocks;
    member.barrier = &barrier;
    try {
      std::optional<at::ThreadLocalStateGuard> guard;
      if (caller_state && member.index != 0) guard.emplace(*caller_state);
      body(member);
    } catch (...) {
      {
        const std::lock_guard<std::mutex> lock(error_mutex);
        if (!error) error = std::current_exception();
      }
      barrier.fail();
    }
  }
#else
  // Without OpenMP one thread runs every block; its syncs are no-ops.
  TeamMember member;
  member.blocks = blocks;
  try {
    body(member);
  } catch (...) {
    error = std::current_exception();
  }
#endif
  if (error) std::rethrow_exception(error);
}

}  // namespace rnnattn
