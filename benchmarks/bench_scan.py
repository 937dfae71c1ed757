"""Selective scan benchmarks: dlcore.selective_scan vs the eager reference (the loop formulation)
vs transformers' MambaMixer slow path (its ``mamba_selective_scan`` fallback: discretise the whole
sequence, then a Python loop over L, as ``MambaMixer.forward`` runs without mamba_ssm), with
Mamba's inputs (variable B/C, D, gate z, delta_bias, softplus).

``python -m benchmarks --family scan`` puts the cases in the suite-wide table;
``python -m benchmarks.bench_scan`` also prints the rate in state updates per second
(batch * dim * L * N / time).
"""

from __future__ import annotations

import argparse

import torch

import dlcore
from dlcore.reference.scan import selective_scan_reference, selective_state_update_reference

from . import harness


def _transformers_mamba():
    try:
        from transformers.models.mamba import modeling_mamba
    except ImportError:
        return None
    return modeling_mamba


def _inputs(device, dtype, batch, dim, n, length, requires_grad=False):
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0, dt=dtype):
        t = (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dt)
        return t.requires_grad_(requires_grad)

    return dict(
        u=rnd(batch, dim, length),
        delta=rnd(batch, dim, length, scale=0.5),
        A=(-torch.exp(torch.randn(dim, n, generator=gen) * 0.5))
        .to(device)
        .requires_grad_(requires_grad),
        B=rnd(batch, n, length),
        C=rnd(batch, n, length),
        D=rnd(dim, dt=torch.float32),
        z=rnd(batch, dim, length),
        delta_bias=rnd(dim, scale=0.5, dt=torch.float32),
    )


def _scan_case(name, batch, dim, n, length, dtype, devices, *, backward, goal, quick=True):
    def setup(device):
        x = _inputs(device, dtype, batch, dim, n, length, requires_grad=backward)
        leaves = [t for t in x.values() if t.requires_grad]

        def call(fn, **extra):
            def run():
                out = fn(x["u"], x["delta"], x["A"], x["B"], x["C"], D=x["D"], z=x["z"],
                         delta_bias=x["delta_bias"], delta_softplus=True, **extra)  # fmt: skip
                if backward:
                    return torch.autograd.grad(out, leaves, torch.ones_like(out))
                return out

            return run

        fns = {"dlcore": call(dlcore.selective_scan), "eager": call(selective_scan_reference)}
        hf = _transformers_mamba()
        if hf is not None:
            fns["transformers"] = call(
                hf.mamba_selective_scan, use_mambapy=False, use_associative_scan=False
            )
        return fns

    elem = batch * dim * length * torch.empty((), dtype=dtype).element_size()
    bc = 2 * batch * n * length * torch.empty((), dtype=dtype).element_size()
    return harness.Case(
        family="scan",
        name=name,
        setup=setup,
        peer="transformers",
        # forward must read u, delta, z, B, C and write out
        bytes_moved=0 if backward else 4 * elem + bc,
        dtype=dtype,
        devices=devices,
        quick=quick,
        goal=goal,
        notes={"state_updates": batch * dim * length * n},
    )


def _decode_case(name, batch, dim, n, dtype, devices):
    def setup(device):
        gen = torch.Generator().manual_seed(0)

        def rnd(*shape, scale=1.0):
            return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

        state = rnd(batch, dim, n)
        x, dt, z = rnd(batch, dim), rnd(batch, dim, scale=0.5), rnd(batch, dim)
        A = -torch.exp(torch.randn(dim, n, generator=gen) * 0.5).to(device)
        B, C = rnd(batch, n), rnd(batch, n)
        D, dt_bias = rnd(dim), rnd(dim)
        args = (x, dt, A, B, C)
        kw = dict(D=D, z=z, dt_bias=dt_bias, dt_softplus=True)
        fns = {
            "dlcore": lambda: dlcore.selective_state_update(state, *args, **kw),
            "eager": lambda: selective_state_update_reference(state, *args, **kw),
        }
        hf = _transformers_mamba()
        if hf is not None:
            fns["transformers"] = lambda: hf.mamba_selective_state_update(state, *args, **kw)
        return fns

    return harness.Case(
        family="scan",
        name=name,
        setup=setup,
        peer="transformers",
        bytes_moved=2 * batch * dim * n * torch.empty((), dtype=dtype).element_size(),
        dtype=dtype,
        devices=devices,
        notes={"state_updates": batch * dim * n},
    )


CASES = [
    _scan_case("fwd-b1-d1536-N16-L2048-fp32", 1, 1536, 16, 2048, torch.float32, ("cpu",),
               backward=False, goal=">= 30x transformers slow path and >= 30x eager"),
    # Autograd through the eager loop costs seconds per call at L=2048: full runs only.
    _scan_case("fwd+bwd-b1-d1536-N16-L2048-fp32", 1, 1536, 16, 2048, torch.float32, ("cpu",),
               backward=True, goal=">= 10x autograd through eager", quick=False),
    _scan_case("fwd+bwd-b1-d1536-N16-L256-fp32", 1, 1536, 16, 256, torch.float32, ("cpu",),
               backward=True, goal=">= 10x autograd through eager"),
    _decode_case("decode-step-b8-d1536-N16-fp32", 8, 1536, 16, torch.float32, ("cpu",)),
    _scan_case("fwd-b8-d2048-N16-L4096-bf16", 8, 2048, 16, 4096, torch.bfloat16, ("cuda",),
               backward=False, goal=">= 70% HBM bandwidth"),
    _scan_case("fwd+bwd-b8-d2048-N16-L4096-bf16", 8, 2048, 16, 4096, torch.bfloat16, ("cuda",),
               backward=True, goal=">= 20x autograd through eager", quick=False),
    _decode_case("decode-step-b64-d2048-N16-bf16", 64, 2048, 16, torch.bfloat16, ("cuda",)),
]  # fmt: skip

test_scan = harness.pytest_benchmark_test(CASES)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--budget", type=float, default=20.0, help="seconds per case")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(f"device: {harness.device_name(device)}")
    for case in CASES:
        if device.type not in case.devices:
            continue
        times = harness.time_interleaved(
            case.setup(device), device, repeats=7, sample_seconds=0.05,
            budget_seconds=args.budget,
        )  # fmt: skip
        t = times["dlcore"]
        rate = case.notes["state_updates"] / t
        ratios = ", ".join(f"{k} {v * 1e3:.2f} ms ({v / t:.1f}x)" for k, v in times.items())
        print(f"{case.name}: {ratios}; {rate / 1e9:.2f} G state updates/s  [goal {case.goal}]")


if __name__ == "__main__":
    main()
