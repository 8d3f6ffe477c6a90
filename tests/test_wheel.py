"""`pip wheel` makes a wheel that installs into a fresh virtual environment and works there: outside
the source tree, without the development install, with the CUDA kernels this build has."""

import os
import subprocess
import sys
import textwrap
import venv
import zipfile

import pytest
import torch

from rnnattn_ext import info

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMOKE = textwrap.dedent("""
    import json, sys
    import torch
    import rnnattn_ext
    from rnnattn_ext import info
    torch.manual_seed(0)
    ours = rnnattn_ext.LSTM(6, 8, num_layers=2, batch_first=True)
    peer = torch.nn.LSTM(6, 8, num_layers=2, batch_first=True)
    peer.load_state_dict(ours.state_dict())
    x = torch.randn(3, 5, 6, requires_grad=True)
    y, _ = ours(x)
    y.sum().backward()
    ours_grad = x.grad.clone()
    x.grad = None
    expected, _ = peer(x)
    expected.sum().backward()
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(ours_grad, x.grad)
    attn = rnnattn_ext.AttnGRU(6, 8, num_heads=2, window=3)
    attn(torch.randn(5, 2, 6))
    print(json.dumps({"file": rnnattn_ext.__file__, "library": rnnattn_ext.library_path(),
                      "architectures": info.cuda_architectures(), "ops": len(info.registered_ops())}))
""")


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_environment_and_runs(tmp_path):
    wheels = tmp_path / "wheels"
    # The wheel's build shares build/<wheel tag> with the development install: it rebuilds only what changed.
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--quiet", "-w", str(wheels), ROOT],
        capture_output=True, text=True, timeout=1800,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    [wheel] = list(wheels.glob("rnnattn_ext-*.whl"))

    # A fresh environment that has torch: this one's torch, reached through a path file (installing
    # torch again would copy gigabytes), but nothing of the development install of rnnattn_ext.
    env_dir = tmp_path / "env"
    venv.create(env_dir, with_pip=True)
    python = str(env_dir / "bin" / "python")
    env_site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
    torch_site = os.path.dirname(os.path.dirname(torch.__file__))
    with open(os.path.join(env_site, "shared_torch.pth"), "w") as f:
        f.write(torch_site + "\n")
    # --no-deps: pip does not count a distribution reached through a path file as installed; the
    # requirement on torch is checked in the wheel's metadata below.
    install = subprocess.run([python, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet", str(wheel)],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stdout + install.stderr

    with zipfile.ZipFile(wheel) as archive:
        [metadata] = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        assert "Requires-Dist: torch>=2.11" in archive.read(metadata).decode()
        # PEP 561: type checkers read the package's annotations.
        assert "rnnattn_ext/py.typed" in archive.namelist()

    # Neither the source tree (PYTHONPATH) nor another build of the library (RNNATTN_LIBRARY, set by
    # scripts/cpu_sanitizer.sh or a developer) may stand in for what the wheel installed.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RNNATTN_LIBRARY")}
    smoke = subprocess.run([python, "-c", SMOKE], capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert smoke.returncode == 0, smoke.stdout + smoke.stderr
    import json

    report = json.loads(smoke.stdout.strip().splitlines()[-1])
    assert report["file"].startswith(env_site), report["file"]  # the wheel's copy, not the source tree
    assert report["library"].startswith(env_site)
    assert report["architectures"] == info.cuda_architectures()  # CUDA kernels in the wheel iff in this build
    assert report["ops"] == len(info.registered_ops())
