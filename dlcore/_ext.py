"""Loads the compiled extensions. dlcore imports without them; `dlcore.backends()` says why."""

from __future__ import annotations

import importlib

import torch  # noqa: F401  (the extensions link against libtorch, which torch loads)

_BUILD_HINT = "build it with `pip install --no-build-isolation -e .` from the dlcore checkout"


def _load(module: str) -> str | None:
    """Import dlcore.<module>; return None on success, else the reason it is unavailable."""
    try:
        importlib.import_module(f"dlcore.{module}")
    except ImportError as exc:
        return f"dlcore.{module} is not built or failed to load ({exc}); {_BUILD_HINT}"
    return None


# The CPU library defines every kernel schema, so it must load before the CUDA one.
CPU_EXT_ERROR: str | None = _load("_C")
CUDA_EXT_ERROR: str | None = (
    "dlcore._C_cuda needs dlcore._C first: " + CPU_EXT_ERROR if CPU_EXT_ERROR else _load("_C_cuda")
)
