"""Large CPU outputs reuse memory that earlier calls freed (csrc/engine/reused_memory.*): a freed
output's block goes to the next call that asks for about its size, never to a tensor still alive;
a call that finds none lets the oldest go first; at most RNNATTN_CPU_KEEP_MB MiB is kept;
rnnattn_ext.empty_cache() hands it back. Each case runs in
a fresh process: the limit is read once per process, and other tests' outputs would be kept too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

MiB = 1 << 20

PRELUDE = textwrap.dedent("""
    import json
    import torch
    import rnnattn_ext
    from rnnattn_ext import _ops
    torch.manual_seed(0)
    kept = _ops._C.cpu_kept_bytes
    # Time-major LSTM(16, 256) over T=256, B=8: the output is 2 MiB, the training workspace 10 MiB.
    model = rnnattn_ext.LSTM(16, 256)
    x = torch.randn(256, 8, 16)
""")


def run(script: str, keep_mb: str | None = None) -> dict:
    env = dict(os.environ)
    env.pop("RNNATTN_CPU_KEEP_MB", None)
    if keep_mb is not None:
        env["RNNATTN_CPU_KEEP_MB"] = keep_mb
    result = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(script)], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_freed_output_is_reused_and_a_live_one_never():
    numbers = run("""
        with torch.no_grad():
            first = model(x)[0]
            address, expected = first.data_ptr(), first.clone()
            del first
            kept_after_free = kept()
            second = model(x)[0]          # takes the freed block
            third = model(x)[0]           # the second is alive: a block of its own
        print(json.dumps({"kept_after_free": kept_after_free, "second_reused": second.data_ptr() == address,
                          "third_distinct": third.data_ptr() != second.data_ptr(),
                          "equal": torch.equal(second, expected) and torch.equal(third, expected),
                          "kept_now": kept()}))
    """)
    assert numbers["kept_after_free"] >= 2 * MiB
    assert numbers["second_reused"] and numbers["third_distinct"] and numbers["equal"]
    assert numbers["kept_now"] == 0


def test_training_reuses_the_workspace_with_the_same_gradients():
    numbers = run("""
        x.requires_grad_(True)
        grads = []
        for _ in range(3):
            model.zero_grad(); x.grad = None
            model(x)[0].square().sum().backward()
            grads.append([x.grad.clone()] + [p.grad.clone() for p in model.parameters()])
        # Output, workspace and input gradient were freed by the last iteration and are kept.
        same = all(torch.equal(a, b) for later in grads[1:] for a, b in zip(grads[0], later))
        print(json.dumps({"same": same, "kept": kept()}))
    """)
    assert numbers["same"]
    assert numbers["kept"] >= 10 * MiB


def test_an_output_of_another_size_lets_the_kept_blocks_go_first():
    # Kept memory must not add to the peak: a call that finds no block of its size frees the oldest
    # kept ones (at least its own size) before it makes its own.
    numbers = run("""
        with torch.no_grad():
            model(x)                                  # its 2 MiB output kept
            kept_before = kept()
            longer = model(torch.randn(512, 8, 16))[0]  # 4 MiB: no kept block fits
            kept_during = kept()
            del longer
        print(json.dumps({"before": kept_before, "during": kept_during, "after": kept()}))
    """)
    assert numbers["before"] == 2 * MiB
    assert numbers["during"] == 0
    assert numbers["after"] == 4 * MiB


def test_empty_cache_hands_the_kept_memory_back():
    numbers = run("""
        with torch.no_grad():
            model(x)
        before = kept()
        rnnattn_ext.empty_cache()
        print(json.dumps({"before": before, "after": kept()}))
    """)
    assert numbers["before"] >= 2 * MiB and numbers["after"] == 0


def test_the_limit_bounds_what_is_kept():
    script = """
        with torch.no_grad():
            outputs = [model(x)[0] for _ in range(3)]   # three live 2 MiB outputs
        del outputs
        print(json.dumps({"kept": kept()}))
    """
    assert run(script, keep_mb="3")["kept"] <= 3 * MiB
    assert run(script, keep_mb="0")["kept"] == 0
    assert run(script)["kept"] >= 6 * MiB  # the default keeps all three


def test_a_reused_output_can_be_resized_like_any_tensor():
    numbers = run("""
        with torch.no_grad():
            model(x)                      # one block kept
            y = model(x)[0]               # reused
        expected = y.clone()
        y.resize_(512, 8, 256)            # a bigger block, the values kept
        print(json.dumps({"kept": torch.equal(y[:256], expected)}))
    """)
    assert numbers["kept"]


def test_a_bad_limit_raises_naming_the_variable():
    env = dict(os.environ, RNNATTN_CPU_KEEP_MB="lots")
    script = PRELUDE + "\nwith torch.no_grad():\n    model(x)\n"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode != 0
    assert "RNNATTN_CPU_KEEP_MB must be a non-negative integer" in result.stderr
    assert "'lots'" in result.stderr


def test_a_fork_while_another_thread_holds_the_lock_leaves_the_child_free_to_allocate():
    # A thread holds the kept blocks' lock for 0.5 s; the main thread forks meanwhile. The fork waits
    # for the lock, and the child's own large output (which takes the lock) must not wait forever.
    # The child runs on one thread, as torch's DataLoader workers do: GNU OpenMP's thread pool does
    # not survive a fork (torch's own parallel ops wait forever in such a child too).
    numbers = run("""
        import os, threading, time
        with torch.no_grad():
            model(x)                      # the allocator exists, one block kept
        holder = threading.Thread(target=_ops._C._hold_cpu_kept_memory_lock, args=(0.5,))
        holder.start()
        time.sleep(0.1)                   # the holder has the lock now
        pid = os.fork()
        if pid == 0:
            torch.set_num_threads(1)
            with torch.no_grad():
                y = model(x)[0]           # a 2 MiB output: takes the lock
            os._exit(0 if y.shape == (256, 8, 256) else 3)
        deadline = time.monotonic() + 30
        status = None
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        holder.join()
        print(json.dumps({"child_status": status, "finished": status is not None and done == pid}))
    """)
    assert numbers["finished"], "the forked child hung on the kept memory's lock"
    assert numbers["child_status"] == 0


def test_the_lock_holder_names_a_time_out_of_bounds():
    script = "from rnnattn_ext import _ops; _ops._C._hold_cpu_kept_memory_lock(-1)"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "_hold_cpu_kept_memory_lock: seconds must be in [0, 60], got -1" in result.stderr
