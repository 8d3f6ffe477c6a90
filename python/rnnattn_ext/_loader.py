"""Loads the compiled library after checking it was built for the running torch."""

import importlib.util
import os
import sys

import torch


def load_extension():
    try:
        from . import _build_info
    except ImportError as exc:  # source tree without a build
        raise ImportError(
            "rnnattn_ext is not built: install it with `pip install --no-build-isolation .` "
            "from the source tree (see README.md)"
        ) from exc
    if _build_info.TORCH_VERSION != torch.__version__:
        raise ImportError(
            f"rnnattn_ext was built against torch {_build_info.TORCH_VERSION} but the running torch is "
            f"{torch.__version__}; rebuild it against this torch with "
            "`pip install --no-build-isolation --force-reinstall --no-deps .` in the source tree"
        )
    other_build = os.environ.get("RNNATTN_LIBRARY")
    if other_build:
        return _load_other_build(other_build)
    from . import _C

    return _C


def _load_other_build(path: str):
    """RNNATTN_LIBRARY: another build of the compiled library, built from this source tree against the
    running torch, loaded in place of the installed one (scripts/cpu_sanitizer.sh runs the tests on
    one built with AddressSanitizer)."""
    if not os.path.isfile(path):
        raise ImportError(f"RNNATTN_LIBRARY must name a built rnnattn_ext._C library file, got {path!r}")
    spec = importlib.util.spec_from_file_location(f"{__package__}._C", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[spec.name]
        raise
    return module
