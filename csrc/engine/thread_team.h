// The threads of one CPU time loop. Each member owns a fixed set of unit blocks for the whole
// sequence (so its slice of the weights stays in its core's cache) and the members meet at a spin
// barrier between the phases of a step. One parallel region per call replaces a fork and join per
// step, whose cost is a large part of a small-batch step.
#pragma once
#include <atomic>
#include <cstdint>
#include <functional>
#include <utility>

namespace rnnattn {

class TeamBarrier {
 public:
  // Waits until all `members` (the team's size, the same for every member) have arrived; false when
  // a member has failed instead (the loop must stop).
  bool wait(int64_t members) { return wait_for(arrive(members)); }
  // The same meeting in two halves: arrive() says this member is done with the phase, and returns
  // the ticket wait_for() takes to wait for the others. Between the two a member may do work that no
  // other member waits for, instead of spinning while a late member finishes.
  int64_t arrive(int64_t members);
  bool wait_for(int64_t ticket);
  void fail() { failed_.store(true, std::memory_order_release); }
  bool failed() const { return failed_.load(std::memory_order_acquire); }

 private:
  alignas(64) std::atomic<int64_t> arrived_{0};
  alignas(64) std::atomic<int64_t> generation_{0};
  alignas(64) std::atomic<bool> failed_{false};
};

// Part `part` of `n` items (units, rows, panels, heads) dealt into `parts` near-equal contiguous
// parts: [n * part / parts, n * (part + 1) / parts).
inline std::pair<int64_t, int64_t> even_share(int64_t n, int64_t part, int64_t parts) {
  return {n * part / parts, n * (part + 1) / parts};
}

struct TeamMember {
  int64_t index = 0;    // this member
  int64_t members = 1;  // the team's size
  int64_t blocks = 1;   // unit blocks, dealt round-robin: member i owns i, i + members, ...
  TeamBarrier* barrier = nullptr;

  // Runs fn(c) for each block this member owns.
  template <typename Fn>
  void for_each_block(Fn&& fn) const {
    for (int64_t c = index; c < blocks; c += members) fn(c);
  }
  // Waits for every member to finish the current phase; false if the loop must stop.
  bool sync() const { return members == 1 || barrier->wait(members); }
  // sync() in two halves (TeamBarrier::arrive, wait_for).
  int64_t arrive() const { return members == 1 ? 0 : barrier->arrive(members); }
  bool wait_for(int64_t ticket) const { return members == 1 || barrier->wait_for(ticket); }
};

// Runs body(member) on up to `blocks` threads (fewer if the thread pool has fewer) and waits for
// them. Inline on the calling thread for one block. The first exception a member throws stops every
// member at its next sync and is rethrown here. With `aten_state`, members run under the caller's
// thread-local ATen state (grad mode, dispatch keys) because the body calls ATen.
void run_team(int64_t blocks, bool aten_state, const std::function<void(const TeamMember&)>& body);

}  // namespace rnnattn
