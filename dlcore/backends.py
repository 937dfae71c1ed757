"""Backend registry: which backends exist, which run here, and which one an op call uses.

Backends: ``triton`` (CUDA GPUs; CPU tensors in the Triton interpreter, for tests), ``cuda``
(C++/CUDA extension), ``cpu`` (C++ extension), ``eager`` (the PyTorch reference, always there).
The default is the best available backend for the tensors' device; ``DLCORE_BACKEND=<name>`` or
``with dlcore.backend("<name>"):`` forces one, and a forced backend that cannot run raises.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import importlib.metadata
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from types import ModuleType

import torch

from . import _ext

BACKENDS = ("triton", "cuda", "cpu", "eager")
# Default preference per device type, best first; an op only considers the backends it implements.
_DEFAULT_ORDER = {"cuda": ("cuda", "triton", "eager"), "cpu": ("cpu", "eager")}

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("dlcore_backend", default=None)


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    detail: str

    def __str__(self) -> str:
        return f"{self.name}: {'available' if self.available else 'unavailable'} ({self.detail})"


@functools.cache
def _triton_version() -> str | None:
    # Read the version without importing triton: on a CPU-only machine triton must first be
    # imported after TRITON_INTERPRET is set (see triton_kernels). Cached: the metadata lookup
    # scans site-packages (~0.2 ms), and select() runs it on every op call.
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None


def _triton_status() -> BackendStatus:
    version = _triton_version()
    if version is None:
        return BackendStatus("triton", False, "triton is not installed")
    if torch.cuda.is_available():
        return BackendStatus("triton", True, f"triton {version} on CUDA")
    return BackendStatus(
        "triton",
        True,
        f"triton {version} interpreter: no CUDA device, kernels run on CPU tensors "
        "(slow, for tests)",
    )


def _cuda_status() -> BackendStatus:
    if torch.version.cuda is None:
        return BackendStatus("cuda", False, f"this torch ({torch.__version__}) is a CPU-only build")
    if not torch.cuda.is_available():
        return BackendStatus("cuda", False, "no CUDA device is visible")
    if _ext.CUDA_EXT_ERROR:
        return BackendStatus("cuda", False, _ext.CUDA_EXT_ERROR)
    return BackendStatus("cuda", True, f"dlcore._C_cuda on {torch.cuda.get_device_name()}")


def _cpu_status() -> BackendStatus:
    if _ext.CPU_EXT_ERROR:
        return BackendStatus("cpu", False, _ext.CPU_EXT_ERROR)
    return BackendStatus("cpu", True, f"dlcore._C, {torch.get_num_threads()} threads")


def backends() -> dict[str, BackendStatus]:
    """Every backend with whether it can run on this machine and why (not)."""
    return {
        "triton": _triton_status(),
        "cuda": _cuda_status(),
        "cpu": _cpu_status(),
        "eager": BackendStatus("eager", True, "PyTorch reference"),
    }


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(
            f"unknown dlcore backend {name!r} (from {source}); expected one of {BACKENDS}"
        )
    return name


@contextlib.contextmanager
def backend(name: str | None) -> Iterator[None]:
    """Force ``name`` for dlcore ops called inside the block (``None`` restores the default)."""
    if name is not None:
        _check_name(name, "dlcore.backend()")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def forced_backend() -> str | None:
    """The backend forced by ``dlcore.backend(...)`` or else ``DLCORE_BACKEND``, if any."""
    name = _forced.get()
    if name is not None:
        return name
    env = os.environ.get("DLCORE_BACKEND", "").strip()
    return _check_name(env, "DLCORE_BACKEND") if env else None


def _runs_on(name: str, device: torch.device) -> str | None:
    """None if backend ``name`` can take tensors on ``device``, else why not."""
    status = backends()[name]
    if not status.available:
        return status.detail
    if name == "cpu" and device.type != "cpu":
        return f"the cpu backend takes CPU tensors, got {device.type} tensors"
    if name == "cuda" and device.type != "cuda":
        return f"the cuda backend takes CUDA tensors, got {device.type} tensors"
    if name == "triton" and device.type not in ("cuda", "cpu"):
        return f"the triton backend takes CUDA tensors, got {device.type} tensors"
    if name == "triton" and device.type == "cpu" and torch.cuda.is_available():
        return (
            "CPU tensors run under triton only in interpreter mode, which is off on a GPU machine"
        )
    return None


def select(op: str, device: torch.device, implemented: Iterable[str]) -> str:
    """The backend that runs ``op`` on ``device``; raises if a forced backend cannot run it."""
    implemented = tuple(implemented)
    forced = forced_backend()
    if forced is not None:
        if forced not in implemented:
            raise RuntimeError(
                f"dlcore backend {forced!r} is forced but does not implement {op} "
                f"(implemented: {', '.join(implemented)})"
            )
        why = _runs_on(forced, device)
        if why:
            raise RuntimeError(f"dlcore backend {forced!r} is forced but cannot run {op}: {why}")
        return forced
    key = (device.type, implemented)
    choice = _DEFAULT_CHOICE.get(key)
    if choice is None:
        choice = next(
            (
                name
                for name in _DEFAULT_ORDER.get(device.type, ("eager",))
                if name in implemented and _runs_on(name, device) is None
            ),
            "eager",
        )
        _DEFAULT_CHOICE[key] = choice
    return choice


# Unforced choices per (device type, implemented backends): availability is fixed for a process,
# and working it out (four status probes) cost ~10 us per op call.
_DEFAULT_CHOICE: dict[tuple[str, tuple[str, ...]], str] = {}


def triton_kernels(family: str) -> ModuleType:
    """Import ``dlcore.kernels.<family>``, in interpreter mode when there is no CUDA device.

    Triton decides at decoration time whether a kernel is interpreted, so the switch must be set
    before the kernel module is first imported.
    """
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        if "triton" in sys.modules:
            raise RuntimeError(
                "the triton backend on CPU tensors needs Triton's interpreter, but triton was "
                "imported before TRITON_INTERPRET=1 was set; set it before importing triton"
            )
        os.environ["TRITON_INTERPRET"] = "1"
    return importlib.import_module(f"dlcore.kernels.{family}")
