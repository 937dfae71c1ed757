"""``python -m dlcore check``: parity of every op x available backend x dtype on this machine.

Each family's ops module provides ``parity_cases()``: small random inputs, the dlcore call and the
eager reference. Every case runs on each backend that implements it and can run here, is compared
with the reference in float64 by DESIGN.md's rule, and lands in one table. Exit status 1 on any
failure.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .backends import BACKENDS, _runs_on, backend, backends
from .testing import cast_floats, parity

FAMILIES = ("sampler", "attention", "scan", "lora")


@dataclass(frozen=True)
class Case:
    """One parity check. ``make(dtype, device, generator)`` returns (args, kwargs); ``run`` is
    the dlcore call and ``reference`` the eager reference; both return a tensor or a tuple of
    tensors (compared element by element, named by ``outputs``)."""

    op: str
    label: str
    make: Callable[[torch.dtype, torch.device, torch.Generator], tuple[tuple, dict]]
    run: Callable[..., Any]
    reference: Callable[..., Any]
    backends: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)
    outputs: tuple[str, ...] = ("out",)


def _as_tuple(x: Any) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def collect(families: tuple[str, ...] | None = None) -> list[Case]:
    cases = []
    for fam in families or FAMILIES:
        try:
            module = importlib.import_module(f"dlcore.ops.{fam}")
        except ModuleNotFoundError:
            continue  # family not shipped in this build
        cases += module.parity_cases()
    return cases


def run_checks(device: torch.device, only_backend: str | None = None, seed: int = 0) -> list[dict]:
    rows = []
    status = backends()
    for case in collect():
        for name in case.backends:
            if only_backend and name != only_backend:
                continue
            why = None if status[name].available else status[name].detail
            why = why or _runs_on(name, device)
            for dtype in case.dtypes:
                row = {"op": case.op, "case": case.label, "backend": name, "dtype": dtype}
                if why:
                    rows.append({**row, "skipped": why})
                    continue
                gen = torch.Generator(device="cpu").manual_seed(seed)
                args, kwargs = case.make(dtype, device, gen)
                try:
                    with backend(name):
                        got = _as_tuple(case.run(*args, **kwargs))
                    ref64 = _as_tuple(
                        case.reference(
                            *cast_floats(args, torch.float64), **cast_floats(kwargs, torch.float64)
                        )
                    )
                    ref_lp = _as_tuple(case.reference(*args, **kwargs))
                    results = [
                        parity(g, r, rl, name=o)
                        for g, r, rl, o in zip(got, ref64, ref_lp, case.outputs, strict=True)
                    ]
                    worst = max(results, key=lambda r: r.max_abs / max(r.tol, 1e-30))
                    rows.append({**row, "result": worst, "passed": all(r.passed for r in results)})
                except Exception as exc:  # a crash is a failure of that row, not of the run
                    rows.append({**row, "error": f"{type(exc).__name__}: {exc}", "passed": False})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dlcore check", description=__doc__)
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda")
    )
    parser.add_argument("--backend", choices=BACKENDS, help="only this backend")
    args = parser.parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200)
    for s in backends().values():
        console.print(str(s))
    rows = run_checks(torch.device(args.device), args.backend)
    table = Table(title=f"dlcore parity vs float64 reference on {args.device}")
    for col in ("op", "case", "backend", "dtype", "max abs", "max rel", "tolerance", "result"):
        table.add_column(col)
    for r in rows:
        dtype = str(r["dtype"]).replace("torch.", "")
        if "skipped" in r:
            table.add_row(
                r["op"], r["case"], r["backend"], dtype, "", "", "", f"skip: {r['skipped']}"
            )
        elif "error" in r:
            table.add_row(
                r["op"], r["case"], r["backend"], dtype, "", "", "", f"[red]ERROR {r['error']}"
            )
        else:
            res = r["result"]
            verdict = "[green]pass" if r["passed"] else "[red]FAIL"
            table.add_row(
                r["op"],
                r["case"],
                r["backend"],
                dtype,
                f"{res.max_abs:.2e}",
                f"{res.max_rel:.2e}",
                f"{res.tol:.2e}",
                verdict,
            )
    console.print(table)
    failed = [r for r in rows if r.get("passed") is False]
    ran = sum(1 for r in rows if "passed" in r)
    console.print(
        f"{ran - len(failed)} passed, {len(failed)} failed, "
        f"{len(rows) - ran} skipped (backend unavailable here)"
    )
    if ran == 0:
        console.print("[red]no parity check ran")
        return 1
    return 1 if failed else 0
