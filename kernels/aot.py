"""Ahead-of-time compile every Triton kernel of dlcore for real GPUs, on any machine.

``python -m dlcore.kernels.aot [--json]`` compiles each ``AOT_SPECS`` entry of every family
module for sm_80 and sm_90 (no GPU needed) and reports registers, shared memory and spills read
from the cubin with the cuobjdump that ships with Triton. Exit status 1 if any compile fails.
Interpreter mode must be off: interpreted kernels cannot be compiled.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

ARCHS = (80, 90)


@dataclass(frozen=True)
class Spec:
    """One launchable variant of a kernel: argument types, constexpr values and launch config."""

    kernel: Any  # a @triton.jit function, or an autotuned/heuristics wrapper around one
    signature: dict[str, str]  # argument name -> "*fp32", "i32", "fp32", ... or "constexpr"
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2
    label: str = ""
    maxnreg: int | None = None  # ptxas register cap (.maxnreg), as the launcher passes it


def max_registers(num_warps: int) -> int:
    """The ptxas register cap (.maxnreg) a block of ``num_warps`` warps can still launch with
    (64K registers per SM, at most 255 per thread). Left alone, ptxas often caps at 80 or 128
    registers and spills; launchers pass this as ``maxnreg`` and their specs carry it."""
    return min(255, 65536 // (32 * num_warps) // 8 * 8)


def _jit_function(kernel: Any) -> Any:
    while hasattr(kernel, "fn") and not hasattr(kernel, "src"):
        kernel = kernel.fn  # Autotuner / Heuristics wrap the JITFunction
    return kernel


def _resource_usage(cubin: bytes) -> dict[str, int]:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    usage = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", out)
        usage[key.lower()] = int(m.group(1)) if m else -1
    return usage


def compile_spec(spec: Spec, arch: int) -> dict[str, Any]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit_function(spec.kernel)
    row: dict[str, Any] = {"kernel": fn.__name__, "label": spec.label, "arch": f"sm_{arch}"}
    try:
        src = ASTSource(fn, dict(spec.signature), constexprs=dict(spec.constexprs))
        # Triton prints ptxas' -v log (registers, stack frame, spill stores/loads) when asked.
        os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
        log = io.StringIO()
        # A fresh cache per compile: a cache hit (identical variants) would skip ptxas and its log.
        with tempfile.TemporaryDirectory(prefix="dlcore-aot-") as cache:
            os.environ["TRITON_CACHE_DIR"] = cache
            with contextlib.redirect_stdout(log):
                compiled = triton.compile(
                    src,
                    target=GPUTarget("cuda", arch, 32),
                    options={
                        "num_warps": spec.num_warps,
                        "num_stages": spec.num_stages,
                        **({"maxnreg": spec.maxnreg} if spec.maxnreg else {}),
                    },
                )
        usage = _resource_usage(compiled.asm["cubin"])
        spill = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log.getvalue())]
        row.update(ok=True, shared_bytes=compiled.metadata.shared, **usage)
        row["spill_bytes"] = sum(spill) if spill else None  # None: this triton printed no log
        row["spills"] = usage["local"] > 0 or bool(row["spill_bytes"])
        row["wgmma"] = "wgmma" in compiled.asm["ptx"]
    except Exception as exc:  # report every failure, keep compiling the rest
        row.update(ok=False, error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc())
    return row


def family_modules() -> list[str]:
    import dlcore.kernels as pkg

    return [
        m.name
        for m in pkgutil.iter_modules(pkg.__path__)
        if not m.name.startswith("_") and m.name != "aot"
    ]


def _compile_one(family: str, index: int, arch: int) -> dict[str, Any]:
    # Runs in a worker process: specs hold JIT functions, so workers look them up by index.
    spec = importlib.import_module(f"dlcore.kernels.{family}").AOT_SPECS[index]
    return {"family": family, **compile_spec(spec, arch)}


def compile_all(families: list[str] | None = None, jobs: int | None = None) -> Iterator[dict]:
    """Compile every variant for every arch on ``jobs`` processes; yields rows as they finish."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("unset TRITON_INTERPRET: interpreted kernels cannot be compiled AOT")
    work = []
    for name in families or family_modules():
        module = importlib.import_module(f"dlcore.kernels.{name}")
        work += [(name, i, arch) for i in range(len(module.AOT_SPECS)) for arch in ARCHS]
    with ProcessPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
        futures = [pool.submit(_compile_one, *w) for w in work]
        for future in as_completed(futures):
            yield future.result()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object per variant")
    parser.add_argument("--family", action="append", help="only these kernels/<family>.py")
    parser.add_argument("--jobs", type=int, help="compile processes (default: all cores)")
    args = parser.parse_args(argv)
    ok = True
    for row in compile_all(args.family, args.jobs):
        ok &= row["ok"]
        if args.json:
            print(json.dumps(row), flush=True)
        elif row["ok"]:
            print(
                f"{row['family']:10s} {row['kernel']:36s} {row['label']:28s} {row['arch']}  "
                f"regs={row['reg']:3d} smem={row['shared_bytes']:6d}B local={row['local']}B "
                f"stack={row['stack']}B spilled={row['spill_bytes']}B"
                f"{'  SPILLS' if row['spills'] else ''}"
            )
        else:
            print(
                f"{row['family']:10s} {row['kernel']:36s} {row['label']:28s} {row['arch']}  "
                f"FAILED {row['error']}"
            )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
