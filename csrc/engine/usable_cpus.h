// How many CPUs this process can keep busy at once, which bounds the threads of a CPU time loop.
//
// The loop's threads meet at a spin barrier between steps (thread_team.h): with more threads than
// CPUs a waiting thread spins on the CPU that the thread it waits for needs, and a step that takes
// microseconds takes a scheduler time slice (on a 2-CPU machine, LSTM(256) at batch 1 ran 16x
// slower with 8 threads than with 2). torch.set_num_threads does not know what a container allows.
#pragma once
#include <cstdint>

namespace rnnattn {

// The CPUs of this process's affinity mask, or fewer where a cgroup CPU quota (cgroup v2 cpu.max,
// v1 cpu.cfs_quota_us, on the process's cgroup or one above it) allows less time; at least 1.
// RNNATTN_CPU_MAX_THREADS, a positive integer, replaces what is detected (another value raises).
// Read once, at first use.
int64_t usable_cpus();

}  // namespace rnnattn
