"""Shared benchmark machinery: cases, interleaved timing, machine limits, reports.

A family file ``bench_<family>.py`` defines ``CASES``: each case builds, for a device, the
callables to compare ("dlcore", "eager" and the peer users run today, when installed), all doing
the same work on the same inputs. The runner times them interleaved (one sample of each in turn,
so drift hits all alike), reports medians, speedups and the fraction of this machine's measured
limit (copy bandwidth for memory-bound ops, GEMM rate for compute-bound ones).
"""

from __future__ import annotations

import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

Fn = Callable[[], Any]


@dataclass
class Case:
    family: str
    name: str
    # device -> {"dlcore": fn, "eager": fn, <peer name>: fn, optionally "base": fn, the floor
    # the op cannot beat, e.g. a plain nn.Linear for LoRA}; a missing peer is simply absent.
    setup: Callable[[torch.device], dict[str, Fn]]
    peer: str = ""  # key of the peer in setup()'s dict, e.g. "diffusers"
    bytes_moved: int = 0  # minimum bytes the op must move (memory-bound roofline), or 0
    flops: int = 0  # useful FLOPs (compute-bound roofline), or 0
    dtype: torch.dtype = torch.float32
    devices: tuple[str, ...] = ("cpu", "cuda")
    quick: bool = True  # part of --quick
    goal: str = ""  # the target, printed beside the result
    notes: dict[str, Any] = field(default_factory=dict)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn: Fn, inner: int, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / inner


def time_interleaved(
    fns: dict[str, Fn],
    device: torch.device,
    *,
    repeats: int,
    sample_seconds: float,
    budget_seconds: float,
) -> dict[str, float]:
    """Median seconds per call of each fn; samples alternate between fns after a warm-up."""
    samples = time_interleaved_samples(
        fns, device, repeats=repeats, sample_seconds=sample_seconds, budget_seconds=budget_seconds
    )
    return {n: statistics.median(s) for n, s in samples.items()}


def paired_ratio(samples: dict[str, list[float]], num: str, den: str) -> float:
    """Median over rounds of samples[num][i] / samples[den][i]: both were timed back to back in
    round i, so drift of the machine's speed between rounds cancels out of each ratio."""
    return statistics.median(a / b for a, b in zip(samples[num], samples[den], strict=True))


def time_interleaved_samples(
    fns: dict[str, Fn],
    device: torch.device,
    *,
    repeats: int,
    sample_seconds: float,
    budget_seconds: float,
) -> dict[str, list[float]]:
    """Seconds per call of each fn in each round; a round times every fn once, in turn."""
    inner = {}
    for name, fn in fns.items():
        fn()  # warm-up: compilation, allocator, caches
        once = _time_once(fn, 1, device)
        inner[name] = max(1, min(1000, math.ceil(sample_seconds / max(once, 1e-7))))
    per_round = sum(_time_once(fn, inner[n], device) * inner[n] for n, fn in fns.items())
    repeats = max(3, min(repeats, int(budget_seconds / max(per_round, 1e-9))))
    samples: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(_time_once(fn, inner[name], device))
    return samples


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def rss_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status (e.g. VmRSS, VmHWM), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure_limits(device: torch.device, quick: bool) -> dict[str, float]:
    """This machine's copy bandwidth (bytes/s, read + write counted) and GEMM rates (FLOP/s)."""
    limits = {}
    # 256 MiB buffers on CPU even in quick runs: 64 MiB ones can sit partly in a large L3 and
    # read up to 2x DRAM bandwidth, which no 64 MiB-per-tensor case can reach.
    n = 256 * 2**20 // 4 if device.type == "cpu" else 2**28
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = time_interleaved(
        {"copy": lambda d=dst, s=src: d.copy_(s)},
        device,
        repeats=9,
        sample_seconds=0.05,
        budget_seconds=3,
    )["copy"]
    limits["copy_bandwidth"] = 2 * src.numel() * src.element_size() / t
    del src, dst
    size = 1024 if (device.type == "cpu" and quick) else (2048 if device.type == "cpu" else 8192)
    dtypes = [torch.float32, torch.bfloat16] if device.type == "cpu" else [torch.bfloat16]
    for dtype in dtypes:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        t = time_interleaved(
            {"mm": lambda a=a, b=b: a @ b}, device, repeats=5, sample_seconds=0.1, budget_seconds=3
        )["mm"]
        limits[f"gemm_{str(dtype).replace('torch.', '')}"] = 2 * size**3 / t
    return limits


def fraction_of_limit(case: Case, seconds: float, limits: dict[str, float]) -> tuple[float, str]:
    """(fraction, what) of the roofline this time reaches, or (nan, "") when none applies."""
    if case.bytes_moved:
        return case.bytes_moved / seconds / limits["copy_bandwidth"], "copy bw"
    if case.flops:
        key = f"gemm_{str(case.dtype).replace('torch.', '')}"
        rate = limits.get(key, limits.get("gemm_float32", limits.get("gemm_bfloat16")))
        return case.flops / seconds / rate, key.replace("_", " ")
    return float("nan"), ""


def pytest_benchmark_test(cases: list[Case]):
    """A pytest-benchmark test over every (case, implementation) of a family file."""
    import pytest

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    params = [
        pytest.param(c, impl, id=f"{c.name}-{impl}")
        for c in cases
        if device.type in c.devices
        for impl in ("dlcore", "eager", c.peer or "peer")
    ]

    @pytest.mark.parametrize("case,impl", params)
    def test_benchmark(benchmark, case, impl):
        fns = case.setup(device)
        if impl not in fns:
            pytest.skip(f"{impl} is not installed")
        benchmark.group = case.name
        benchmark(lambda: (fns[impl](), sync(device)))

    return test_benchmark
