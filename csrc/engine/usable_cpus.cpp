#include "engine/usable_cpus.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <string>
#include <thread>

#ifdef __linux__
#include <sched.h>
#endif

namespace rnnattn {
namespace {

int64_t affinity_cpus() {
#ifdef __linux__
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) > 0) return CPU_COUNT(&set);
#endif
  return std::max<int64_t>(1, std::thread::hardware_concurrency());
}

// Whole CPUs' worth of `quota` microseconds of CPU time every `period` (rounded up); 0: no quota.
int64_t quota_cpus(double quota, double period) {
  if (!(quota > 0) || !(period > 0)) return 0;
  return std::max<int64_t>(1, static_cast<int64_t>(std::ceil(quota / period)));
}

// The quota of the cgroup folder `dir`: cgroup v2's cpu.max ("max 100000" or "200000 100000"),
// v1's cpu.cfs_quota_us (-1: none) over cpu.cfs_period_us; 0 where there is none.
int64_t folder_quota_cpus(const std::string& dir, bool v2) {
  if (v2) {
    std::ifstream file(dir + "/cpu.max");
    std::string quota;
    double period = 0;
    if (!(file >> quota >> period) || quota == "max") return 0;
    try {
      return quota_cpus(std::stod(quota), period);
    } catch (...) {
      return 0;
    }
  }
  std::ifstream quota_file(dir + "/cpu.cfs_quota_us"), period_file(dir + "/cpu.cfs_period_us");
  double quota = 0, period = 0;
  if (!(quota_file >> quota) || !(period_file >> period)) return 0;
  return quota_cpus(quota, period);
}

// The lowest quota on this process's cgroup path, from its own cgroup up to the root; 0: none.
int64_t cgroup_quota_cpus() {
  int64_t lowest = 0;
#ifdef __linux__
  std::ifstream cgroups("/proc/self/cgroup");
  std::string line;
  while (std::getline(cgroups, line)) {
    // "0::/path" (v2) or "4:cpu,cpuacct:/path" (v1; its folder is /sys/fs/cgroup/cpu,cpuacct)
    const size_t first = line.find(':'), second = line.find(':', first + 1);
    if (first == std::string::npos || second == std::string::npos) continue;
    const std::string controllers = line.substr(first + 1, second - first - 1);
    const bool v2 = controllers.empty();
    if (!v2 && ("," + controllers + ",").find(",cpu,") == std::string::npos) continue;
    const std::string root = v2 ? "/sys/fs/cgroup" : "/sys/fs/cgroup/" + controllers;
    std::string path = line.substr(second + 1);
    while (!path.empty() && path.back() == '/') path.pop_back();  // "/" becomes "", the root
    for (;;) {
      const int64_t cpus = folder_quota_cpus(root + path, v2);
      if (cpus > 0 && (lowest == 0 || cpus < lowest)) lowest = cpus;
      if (path.empty()) break;
      const size_t parent = path.rfind('/');
      path.erase(parent == std::string::npos ? 0 : parent);
    }
  }
#endif
  return lowest;
}

int64_t find_usable_cpus() {
  const char* text = std::getenv("RNNATTN_CPU_MAX_THREADS");
  if (text != nullptr && text[0] != '\0') {
    char* end = nullptr;
    const long long value = std::strtoll(text, &end, 10);
    TORCH_CHECK(*end == '\0' && value > 0, "rnnattn: the environment variable RNNATTN_CPU_MAX_THREADS must be a "
                "positive integer (the most threads a CPU layer runs on), got '", text, "'");
    return static_cast<int64_t>(std::min<long long>(value, 1 << 16));
  }
  const int64_t affinity = affinity_cpus(), quota = cgroup_quota_cpus();
  return quota > 0 ? std::min(affinity, quota) : affinity;
}

}  // namespace

int64_t usable_cpus() {
  static const int64_t cpus = find_usable_cpus();  // a raise leaves it undecided: the next call raises again
  return cpus;
}

}  // namespace rnnattn
