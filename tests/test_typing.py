"""The package ships py.typed (PEP 561), so type checkers read its annotations: they must hold."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_package_annotations_type_check(tmp_path):
    # The settings (files, imports) are pyproject.toml's [tool.mypy]; a private cache keeps the tree clean.
    result = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache")], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
