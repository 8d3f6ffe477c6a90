#!/usr/bin/env bash
# Runs the CPU tests on a build of the compiled library instrumented with AddressSanitizer and
# UndefinedBehaviorSanitizer (out-of-bounds reads and writes, use after free, signed overflow,
# misaligned or null accesses in our C++), loaded through RNNATTN_LIBRARY in place of the installed
# build; prints what they report, with stacks (exit status 1 then). Needs the set-up environment
# (scripts/setup.sh: torch, cmake, ninja, pytest) and gcc's libasan; CPU only (the CUDA kernels have
# scripts/cuda_sanitizer.sh).
#
#   bash scripts/cpu_sanitizer.sh [pytest arguments]     (default: the tests below)
#
# RNNATTN_SANITIZER_BUILD: the build folder (default build-sanitizer). The default tests are every
# test file but those that build, install or type-check the package (they do not run our C++ any
# differently), the resident-memory bounds of test_resources.py (AddressSanitizer holds freed memory
# back in quarantine: 200 MiB over its 10,000 calls) and the CUDA ones. Torch itself is not
# instrumented: only our code is checked.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${RNNATTN_VENV:-.venv}"
python="${PYTHON:-$venv/bin/python}"
build="${RNNATTN_SANITIZER_BUILD:-build-sanitizer}"
export PATH="$(dirname "$python"):$PATH"  # the venv's cmake and ninja
flags="-fsanitize=address,undefined -fno-omit-frame-pointer"
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DRNNATTN_CUDA=OFF \
  -DPython_EXECUTABLE="$(command -v "$python")" -DCMAKE_CXX_FLAGS="$flags" -DCMAKE_MODULE_LINKER_FLAGS="$flags" >/dev/null
cmake --build "$build"
library="$(ls "$build"/_C*.so)"
asan="$(${CXX:-g++} -print-file-name=libasan.so)"
libstdcxx="$(${CXX:-g++} -print-file-name=libstdc++.so)"
if [ ! -f "$asan" ]; then
  echo "no libasan.so for ${CXX:-g++} (gcc's AddressSanitizer runtime; Debian: libasan8)" >&2
  exit 2
fi
if [ "$#" -eq 0 ]; then
  set -- tests -m "not cuda" \
    --ignore=tests/test_wheel.py --ignore=tests/test_oldest_torch.py --ignore=tests/test_cpu_kernel_builds.py \
    --ignore=tests/test_build.py --ignore=tests/test_typing.py --ignore=tests/test_gpu_scripts.py \
    --ignore=tests/test_demo.py --ignore=tests/test_benchmarks.py --ignore=tests/test_resources.py
fi
# Python and torch are not instrumented: the runtime must come first (LD_PRELOAD), with libstdc++
# (whose __cxa_throw the runtime intercepts: loaded later, the first C++ exception aborts), leaks
# are theirs to keep, and memory they allocate with one API and free with another is not ours to
# report. Reports go to files (pytest captures the tests' output, and a test may run a
# subprocess): AddressSanitizer stops the process at its first, UndefinedBehaviorSanitizer reports
# each and goes on.
reports="$(cd "$build" && pwd)/reports"
rm -rf "$reports"
mkdir -p "$reports"
echo "cpu_sanitizer: $library"
set +e
LD_PRELOAD="$asan $libstdcxx" RNNATTN_LIBRARY="$library" \
  ASAN_OPTIONS="detect_leaks=0:alloc_dealloc_mismatch=0:new_delete_type_mismatch=0:log_path=$reports/asan" \
  UBSAN_OPTIONS="print_stacktrace=1:log_path=$reports/ubsan" \
  "$python" -m pytest -q -p no:cacheprovider "$@"
status=$?
set -e
if [ -n "$(ls -A "$reports")" ]; then
  cat "$reports"/*
  echo "cpu_sanitizer: the sanitizers reported the errors above ($reports)" >&2
  exit 1
fi
exit "$status"
