"""Fused attention benchmarks: dlcore.scaled_dot_product_attention vs the eager reference
(``sdpa_reference``: materialised scores, softmax, PV) vs torch's SDPA, in (B, H, L, D) layout.

- CPU: fp32 and bf16, B=1, H=8, L=2048, D=64, causal and not; forward, and backward alone
  (``autograd.grad`` of a retained graph, so only the backward pass is timed). The peer is torch
  SDPA on CPU (its fused flash CPU kernel).
- CPU memory: L=16384, H=8, D=64, fp32 forward+backward; the notes hold the peak memory beyond
  inputs, outputs and gradients (RSS high-water mark growth), for dlcore and torch SDPA.
- GPU: bf16, D in {64, 128}, L in 1K..16K (tokens per batch fixed at 16K, 2048 hidden); the peer
  is SDPA restricted to its flash backend; the eager reference is left out where its L x L
  scores would not fit.

FLOPs: 4 * B * H * Lq * Lk * D forward (half of it when causal), 2.5x that backward.
``python -m benchmarks --family attention`` puts the cases in the suite-wide table;
``python -m benchmarks.bench_attention [--memory]`` prints GFLOP/s (and the memory figures).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import dlcore
from dlcore.reference.attention import sdpa_reference

from . import harness


def _torch_sdpa(device: torch.device) -> Callable[..., torch.Tensor]:
    if device.type != "cuda":
        return F.scaled_dot_product_attention
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def flash_sdpa(*args, **kwargs):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(*args, **kwargs)

    return flash_sdpa


def _flops(b, h, lq, lk, d, causal, mode):
    fwd = 4 * b * h * lq * lk * d // (2 if causal else 1)
    return int({"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode] * fwd)


def _attn_case(name, b, h, length, d, dtype, causal, mode, devices, *, goal, quick=True,
               eager=True):  # fmt: skip
    """mode "fwd", "bwd" (autograd.grad of a retained graph: the backward alone) or "fwd+bwd"."""
    backward = mode != "fwd"

    def setup(device):
        gen = torch.Generator().manual_seed(0)
        q, k, v = (
            torch.randn(b, h, length, d, generator=gen).to(device, dtype).requires_grad_(backward)
            for _ in range(3)
        )
        impls = {"dlcore": dlcore.scaled_dot_product_attention, "torch_sdpa": _torch_sdpa(device)}
        if eager:
            impls["eager"] = sdpa_reference
        if not backward:
            return {
                impl: (lambda fn=fn: fn(q, k, v, is_causal=causal)) for impl, fn in impls.items()
            }
        dout = torch.randn(q.shape, generator=gen).to(device, dtype)
        if mode == "fwd+bwd":
            return {
                impl: (
                    lambda fn=fn: torch.autograd.grad(
                        fn(q, k, v, is_causal=causal), (q, k, v), dout
                    )
                )
                for impl, fn in impls.items()
            }
        fns = {}
        for impl, fn in impls.items():
            out = fn(q, k, v, is_causal=causal)
            fns[impl] = lambda out=out: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
        return fns

    return harness.Case(
        family="attention",
        name=name,
        setup=setup,
        peer="torch_sdpa",
        flops=_flops(b, h, length, length, d, causal, mode),
        dtype=dtype,
        devices=devices,
        quick=quick,
        goal=goal,
    )


def extra_peak_memory(fn: Callable[..., Any], b: int, h: int, length: int, d: int) -> int | None:
    """Peak bytes one forward+backward of ``fn`` (an SDPA-like function) holds beyond its inputs,
    output and gradients (Linux RSS high-water mark; None where that is unavailable)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, length, d, generator=gen).requires_grad_() for _ in range(3))
    dout = torch.randn(q.shape, generator=gen)

    def step():
        out = fn(q, k, v)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        return out, grads

    kept = sum(t.numel() * t.element_size() for t in (q, q, k, v))  # out, dq, dk, dv
    try:
        libc = ctypes.CDLL("libc.so.6")
        step()  # warm-up: thread pools, allocator arenas
        gc.collect()
        libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        before = harness.rss_bytes("VmRSS")
        result = step()
        peak = harness.rss_bytes("VmHWM") - before
        del result
    except OSError:
        return None
    return peak - kept


MEMORY_SHAPE = (1, 8, 16384, 64)


def _memory_case() -> harness.Case:
    b, h, length, d = MEMORY_SHAPE
    case = _attn_case(
        "cpu-fwd+bwd-memory-b1-h8-L16384-d64-fp32",
        *(b, h, length, d, torch.float32, False, "fwd+bwd", ("cpu",)),
        goal="< 100 MB extra peak memory (notes: peak_extra_mb)",
        quick=False,
        eager=False,
    )
    timed_setup = case.setup

    def setup(device):
        case.notes["peak_extra_mb"] = {
            name: (None if m is None else round(m / 2**20, 1))
            for name, fn in (
                ("dlcore", dlcore.scaled_dot_product_attention),
                ("torch_sdpa", F.scaled_dot_product_attention),
            )
            for m in [extra_peak_memory(fn, *MEMORY_SHAPE)]
        }
        return timed_setup(device)

    case.setup = setup
    return case


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]


CPU_GOAL = ">= 1.0x torch SDPA (CPU flash), >= 3x eager"
GPU_GOAL = "SDPA flash: fwd >= 1.0x, bwd >= 0.8x; H100 goal >= 500 TFLOP/s fwd"
CASES = [
    _attn_case(
        f"cpu-{mode}-b1-h8-L2048-d64-{'causal-' if causal else ''}{_dtype_name(dtype)}",
        *(1, 8, 2048, 64, dtype, causal, mode, ("cpu",)),
        goal=CPU_GOAL,
    )
    for dtype in (torch.float32, torch.bfloat16)
    for causal in (False, True)
    for mode in ("fwd", "bwd")
]
CASES.append(_memory_case())
CASES += [
    _attn_case(
        f"gpu-{mode}-L{length // 1024}K-d{d}-{'causal-' if causal else ''}bf16",
        *(16384 // length, 2048 // d, length, d, torch.bfloat16, causal, mode, ("cuda",)),
        goal=GPU_GOAL,
        quick=length in (2048, 8192),
        eager=length <= 4096,
    )
    for d in (64, 128)
    for length in (1024, 2048, 4096, 8192, 16384)
    for causal in (False, True)
    for mode in ("fwd", "bwd")
]

test_attention = harness.pytest_benchmark_test(CASES)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--budget", type=float, default=10.0, help="seconds per case")
    parser.add_argument("--memory", action="store_true", help="only the L=16384 memory figures")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(f"device: {harness.device_name(device)}, torch {torch.__version__}")
    if args.memory:
        for name, fn in (
            ("dlcore", dlcore.scaled_dot_product_attention),
            ("torch_sdpa", F.scaled_dot_product_attention),
        ):
            extra = extra_peak_memory(fn, *MEMORY_SHAPE)
            shown = "n/a" if extra is None else f"{extra / 2**20:.1f} MB"
            print(f"{name}: fwd+bwd {MEMORY_SHAPE} fp32, extra peak memory {shown}")
        return
    limits = harness.measure_limits(device, quick=True)
    for case in CASES:
        if device.type not in case.devices or not case.quick:
            continue
        times = harness.time_interleaved(
            case.setup(device), device, repeats=5, sample_seconds=0.05,
            budget_seconds=args.budget,
        )  # fmt: skip
        t = times["dlcore"]
        frac, what = harness.fraction_of_limit(case, t, limits)
        rates = ", ".join(
            f"{k} {v * 1e3:.1f} ms {case.flops / v / 1e9:.0f} GFLOP/s ({v / t:.2f}x)"
            for k, v in times.items()
        )
        print(f"{case.name}: {rates}; dlcore at {frac:.0%} of {what}  [goal {case.goal}]")


if __name__ == "__main__":
    main()
