"""scripts/cuda_checks.sh, the GPU machine's one command, run here with stand-ins for python and
compute-sanitizer (no GPU is needed): every stage runs in order within the budget, a stage that
overruns is stopped and reported, and the output folder keeps to the eight files that come back
from a lent GPU machine."""

import os
import re
import stat
import subprocess
import textwrap
import time

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "cuda_checks.sh")

# Answers what the script asks of python; PIP_SECONDS makes the build take that long.
FAKE_PYTHON = r"""#!/usr/bin/env bash
case "$*" in
  *get_device_capability*) echo 90 ;;
  *get_device_name*) echo "GPU stand-in" ;;
  "-c "*) exit 0 ;;
  "-m pip"*) sleep "${PIP_SECONDS:-0}"; echo built ;;
  "-m rnnattn_ext.info") echo "info stand-in" ;;
  *test_fuzz_streaming*) echo "150 passed (streaming)" ;;
  *test_fuzz_modules*) echo "150 passed (modules)" ;;
  *test_fuzz*) echo "250 passed (seed $RNNATTN_FUZZ_SEED)" ;;
  "-m pytest"*) echo "ran: pytest ${*:3}" ;;
  *suite.py*) args="$*"; out="${args##*--out }"; out="${out%% *}"
              for f in json md png; do echo x > "$out/suite_cuda.$f"; done; echo "suite stand-in" ;;
  *bench_recurrent.py*) echo "loop $RNNATTN_CUDA_LOOP" ;;
  *) echo "unexpected: $*"; exit 3 ;;
esac
"""
FAKE_SANITIZER = """#!/usr/bin/env bash
echo "========= ERROR SUMMARY: 0 errors"; echo "3 passed"
"""


def _stand_ins(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("python3", FAKE_PYTHON), ("compute-sanitizer", FAKE_SANITIZER)):
        path = bin_dir / name
        path.write_text(textwrap.dedent(text))
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return bin_dir


def _run(tmp_path, budget, **env):
    bin_dir = _stand_ins(tmp_path)
    out = tmp_path / "out"
    environment = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": str(bin_dir / "python3"),
                   "RNNATTN_CHECKS_SECONDS": str(budget), **env}
    started = time.monotonic()
    result = subprocess.run(["bash", SCRIPT, str(out)], env=environment, capture_output=True, text=True, timeout=120)
    return result, out, time.monotonic() - started


def test_every_stage_runs_in_order_and_the_folder_keeps_to_eight_files(tmp_path):
    result, out, _ = _run(tmp_path, 480)
    assert result.returncode == 0, result.stdout + result.stderr
    headers = [line for line in result.stdout.splitlines() if line.startswith("== ")]
    assert [line.split(" (")[0] for line in headers[:-1]] == [
        "== build", "== persistent loops", "== CUDA tests", "== compute-sanitizer", "== fuzz on the GPU",
        "== speed suite, cuda float32 and bfloat16",
        "== forward loop: one persistent kernel against a cuBLAS product per step"], headers
    assert headers[-1].startswith("== done in ") and headers[-1].endswith(" s of 480"), headers
    assert "ran: pytest -v -p no:cacheprovider -m cuda tests/test_persistent_loop.py" in result.stdout
    assert "memcheck: ERROR SUMMARY: 0 errors | 3 passed" in result.stdout
    assert result.stdout.count("250 passed") == 4
    assert "150 passed (modules)" in result.stdout and "150 passed (streaming)" in result.stdout
    assert "loop per_step" in result.stdout
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and "checks.log" in files and "suite_cuda.json" in files, files
    assert (out / "checks.log").read_text().splitlines().count(headers[0]) == 1


def test_a_stage_that_overruns_is_stopped_and_a_failed_build_ends_the_run(tmp_path):
    result, _, seconds = _run(tmp_path, 3, PIP_SECONDS="30")
    assert result.returncode == 1
    assert seconds < 20, seconds  # stopped at the budget, not after the stand-in build's 30 s
    # Stopped at what was left of the 3 s budget: the script's two Python probes before the build
    # take a second of it on a loaded machine.
    stopped = re.search(r"^== build: stopped after (\d+) s$", result.stdout, re.M)
    assert stopped and 1 <= int(stopped.group(1)) <= 3, result.stdout
    assert "the build failed: nothing else can run" in result.stdout
    assert "== CUDA tests" not in result.stdout
