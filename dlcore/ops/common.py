"""The shared mechanism every family's ops use: input checks with actionable messages, and
backend dispatch. Families register their ops with ``torch.library.custom_op`` (schema),
``register_fake`` (meta) and ``register_autograd``; the custom op's body calls ``dispatch``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from ..backends import backend, forced_backend, select

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_tensor(
    name: str,
    t: Any,
    *,
    ndim: int | Iterable[int] | None = None,
    shape: Sequence[int | None] | None = None,
    dtypes: Iterable[torch.dtype] | None = None,
    device: torch.device | None = None,
    layout: str = "",
) -> torch.Tensor:
    """Raise a ValueError naming ``name``, what was seen and what was expected.

    ``shape`` entries of None match any size; ``layout`` names the axes, e.g. "(batch, dim, L)".
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    want = f" {layout}" if layout else ""
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            raise ValueError(
                f"{name} must have {' or '.join(map(str, allowed))} dimensions{want}, "
                f"got shape {tuple(t.shape)}"
            )
    if shape is not None:
        ok = t.dim() == len(shape) and all(
            s is None or s == d for s, d in zip(shape, t.shape, strict=True)
        )
        if not ok:
            expected = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{name} must have shape {expected}{want}, got {tuple(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            raise ValueError(
                f"{name} must have dtype {' or '.join(map(_dtype_name, dtypes))}, "
                f"got {_dtype_name(t.dtype)}"
            )
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device} like the other inputs, got {t.device}")
    return t


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Kernels take any outer strides but need unit stride in the last dimension."""
    return t if t.stride(-1) == 1 or t.numel() <= 1 else t.contiguous()


def dispatch(
    op: str, impls: Mapping[str, Callable[..., Any]], device: torch.device, *args: Any, **kw: Any
) -> Any:
    """Run ``op`` with the backend chosen for ``device`` among those in ``impls``."""
    return impls[select(op, device, impls)](*args, **kw)


def register_autograd(
    op: str | Any, backward: Callable[..., Any], *, setup_context: Callable[..., None]
) -> None:
    """``torch.library.register_autograd`` whose backward runs on the backend that was forced
    when the forward ran: autograd calls backward after a ``with dlcore.backend(...)`` block has
    exited, and the gradient must come from the same backend as the output."""

    def _setup(ctx: Any, inputs: tuple, output: Any) -> None:
        ctx.dlcore_forced_backend = forced_backend()
        setup_context(ctx, inputs, output)

    def _backward(ctx: Any, *grads: Any) -> Any:
        with backend(ctx.dlcore_forced_backend):
            return backward(ctx, *grads)

    torch.library.register_autograd(op, _backward, setup_context=_setup)


# nn.Parameter disables __torch_function__: it dispatches exactly as a plain tensor.
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def plain_eager(tensors: Sequence[torch.Tensor | None]) -> bool:
    """Not under torch.compile, and every tensor a plain CPU/CUDA tensor or parameter (no meta,
    fake or other subclass): a call that may skip its registered op's per-call bookkeeping
    (~20-50 us)."""
    if torch.compiler.is_compiling():
        return False
    return all(t is None or (type(t) in _PLAIN and (t.is_cpu or t.is_cuda)) for t in tensors)


def needs_registered_op(tensors: Sequence[torch.Tensor | None]) -> bool:
    """Whether a call must go through its registered op: under torch.compile, for autograd, or
    for tensors that are not plain CPU/CUDA tensors. Elsewhere the op's body may run directly."""
    if not plain_eager(tensors):
        return True
    grad = torch.is_grad_enabled()
    return grad and any(t is not None and t.requires_grad for t in tensors)
