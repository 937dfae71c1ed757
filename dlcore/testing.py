"""Parity rule of DESIGN.md, shared by the tests and by ``python -m dlcore check``.

A kernel output passes when its max error against the float64 reference is at most twice the
error of the same-dtype eager reference plus a small floor (the flash-attn rule). Outputs are
poisoned with NaN before a kernel runs, so elements a kernel forgot to write fail.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

# Floor, in units of the dtype's machine epsilon times the reference's magnitude: absorbs the
# last-bit differences when the same-dtype reference happens to be exact.
_FLOOR_EPS = 8.0


@dataclass(frozen=True)
class ParityResult:
    name: str
    max_abs: float  # max |actual - ref64|
    max_rel: float  # max_abs / max |ref64|
    ref_err: float  # max |ref_same_dtype - ref64| (0 when not given)
    tol: float
    passed: bool

    def __str__(self) -> str:
        verdict = "ok" if self.passed else "FAIL"
        return (
            f"{self.name}: max_abs={self.max_abs:.3g} max_rel={self.max_rel:.3g} "
            f"ref_err={self.ref_err:.3g} tol={self.tol:.3g} {verdict}"
        )


def cast_floats(tree: Any, dtype: torch.dtype) -> Any:
    """Cast every floating tensor inside nested tuples/lists/dicts to ``dtype``."""
    if isinstance(tree, torch.Tensor):
        return tree.to(dtype) if tree.is_floating_point() else tree
    if isinstance(tree, (list, tuple)):
        return type(tree)(cast_floats(t, dtype) for t in tree)
    if isinstance(tree, dict):
        return {k: cast_floats(v, dtype) for k, v in tree.items()}
    return tree


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill a floating tensor with NaN in place (so unwritten outputs fail parity)."""
    return t.fill_(float("nan"))


def parity(
    actual: torch.Tensor,
    ref64: torch.Tensor,
    ref_same_dtype: torch.Tensor | None = None,
    *,
    name: str = "output",
    floor: float | None = None,
) -> ParityResult:
    """Compare ``actual`` with the float64 reference by DESIGN.md's rule."""
    if actual.shape != ref64.shape:
        raise AssertionError(
            f"{name}: shape {tuple(actual.shape)} != reference {tuple(ref64.shape)}"
        )
    a = actual.detach().to(torch.float64).cpu()
    r = ref64.detach().to(torch.float64).cpu()
    scale = float(r.abs().max()) if r.numel() else 0.0
    finite = torch.isfinite(r)
    # NaN/inf must match the reference exactly; everywhere else compare values.
    mismatch_nonfinite = bool(((~torch.isfinite(a)) & finite).any()) or bool(
        (a[~finite] != r[~finite]).any() if (~finite).any() else False
    )
    diff = (a - r).abs()[finite]
    max_abs = float(diff.max()) if diff.numel() else 0.0
    ref_err = 0.0
    if ref_same_dtype is not None:
        rd = (ref_same_dtype.detach().to(torch.float64).cpu() - r).abs()[finite]
        ref_err = float(rd.max()) if rd.numel() else 0.0
    if floor is None:
        floor = _FLOOR_EPS * torch.finfo(actual.dtype).eps * max(scale, 1e-3)
    tol = 2.0 * ref_err + floor
    passed = (not mismatch_nonfinite) and max_abs <= tol
    return ParityResult(name, max_abs, max_abs / max(scale, 1e-30), ref_err, tol, passed)


def assert_parity(
    actual: torch.Tensor,
    ref64: torch.Tensor,
    ref_same_dtype: torch.Tensor | None = None,
    *,
    name: str = "output",
    floor: float | None = None,
) -> ParityResult:
    result = parity(actual, ref64, ref_same_dtype, name=name, floor=floor)
    if not result.passed:
        nan = int((~torch.isfinite(actual.detach().double().cpu())).sum())
        raise AssertionError(f"{result} ({nan} non-finite elements in the output)")
    return result


def reference_pair(fn: Callable[..., Any], *args: Any, dtype: torch.dtype, **kwargs: Any):
    """Run an eager reference in float64 and in ``dtype`` on the same inputs: (ref64, ref_dtype)."""
    ref64 = fn(*cast_floats(args, torch.float64), **cast_floats(kwargs, torch.float64))
    ref_lp = fn(*cast_floats(args, dtype), **cast_floats(kwargs, dtype))
    return ref64, ref_lp
