"""Loads the compiled library after checking it was built for the running torch."""

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
    from . import _C

    return _C
