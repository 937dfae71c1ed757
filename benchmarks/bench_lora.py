"""LoRA benchmarks: dlcore.nn.LoRALinear vs peft's lora.Linear vs the eager reference, with the
plain base layer (``nn.Linear``) timed in the same interleaved run as ``"base"``.

On CPU the base GEMM dominates, so the figure of merit is the overhead over the base layer:
``python -m benchmarks.bench_lora`` prints every implementation's time as a multiple of the base
layer's, the median of per-round ratios (the issue's goals are stated that way);
``python -m benchmarks --family lora`` runs the same cases in the suite-wide table (dlcore vs
eager vs peft) and keeps the base time in the JSON.
"""

from __future__ import annotations

import argparse
import random
import statistics

import torch
from torch import nn

from dlcore.nn import LoRALinear
from dlcore.reference import lora as ref

from . import harness

FEATURES, RANK, ALPHA = 4096, 16, 32


def _peft():
    try:
        import peft
    except ImportError:
        return None
    return peft


def _layers(device: torch.device, dtype: torch.dtype, n_adapters: int):
    """(base nn.Linear, peft lora.Linear or None, dlcore LoRALinear) sharing one set of weights,
    with ``n_adapters`` adapters of rank 16 (B random so the adapters matter)."""
    torch.manual_seed(0)
    base = nn.Linear(FEATURES, FEATURES, device=device, dtype=dtype).requires_grad_(False)
    peft = _peft()
    names = [f"a{i}" for i in range(n_adapters)]
    if peft is not None:
        wrapper = nn.Sequential(base)
        cfg = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["0"])
        model = peft.get_peft_model(wrapper, cfg, adapter_name=names[0])
        for name in names[1:]:
            model.add_adapter(name, cfg)
        peft_layer = model.base_model.model[0]
        peft_layer.to(device=device, dtype=dtype)
        dl = LoRALinear.from_peft(peft_layer)
    else:
        peft_layer = None
        dl = LoRALinear(base)
        for name in names:
            dl.add_adapter(name, RANK, ALPHA)
    with torch.no_grad():
        for name in names:
            dl.lora_B[name].weight.normal_(0, 0.02)
    dl.set_adapter(names[0])
    if peft_layer is not None:
        peft_layer.set_adapter(names[0])
    return base, peft_layer, dl, names


def _forward_case(tokens: int, device: torch.device, dtype: torch.dtype):
    base, peft_layer, dl, names = _layers(device, dtype, 1)
    dl.eval()
    x = torch.randn(tokens, FEATURES, device=device, dtype=dtype)
    a, b = dl.lora_A[names[0]].weight, dl.lora_B[names[0]].weight
    s = dl.scaling[names[0]]
    fns = {
        "dlcore": lambda: dl(x),
        "eager": lambda: ref.lora_linear_reference(x, base.weight, base.bias, a, b, s),
        "base": lambda: base(x),
    }
    if peft_layer is not None:
        peft_layer.eval()
        fns["peft"] = lambda: peft_layer(x)
    return _no_grad(fns)


def _no_grad(fns):
    def wrap(fn):
        def run():
            with torch.no_grad():
                return fn()

        return run

    return {k: wrap(f) for k, f in fns.items()}


def _mixed_case(tokens: int, n_adapters: int, device: torch.device, dtype: torch.dtype):
    base, peft_layer, dl, names = _layers(device, dtype, n_adapters)
    dl.eval()
    x = torch.randn(tokens, FEATURES, device=device, dtype=dtype)
    rng = random.Random(0)
    batch = [rng.choice(names) for _ in range(tokens)]
    stack_a = torch.stack([dl.lora_A[n].weight for n in names]).detach()
    stack_b = torch.stack([dl.lora_B[n].weight for n in names]).detach()
    scal = torch.tensor([dl.scaling[n] for n in names], device=device)
    idx = torch.tensor([names.index(n) for n in batch], device=device)
    fns = {
        "dlcore": lambda: dl(x, adapter_names=batch),
        "eager": lambda: ref.lora_linear_multi_reference(
            x, base.weight, base.bias, stack_a, stack_b, scal, idx
        ),
        "base": lambda: base(x),
    }
    if peft_layer is not None:
        peft_layer.eval()
        fns["peft"] = lambda: peft_layer(x, adapter_names=batch)
    return _no_grad(fns)


def _train_case(tokens: int, device: torch.device, dtype: torch.dtype):
    """Forward + backward with the base frozen and the LoRA weights trainable; x is an
    activation that needs no gradient (first adapted layer), dy a fixed output gradient."""
    base, peft_layer, dl, names = _layers(device, dtype, 1)
    dl.train()
    x = torch.randn(tokens, FEATURES, device=device, dtype=dtype)
    dy = torch.randn(tokens, FEATURES, device=device, dtype=dtype)
    a, b = dl.lora_A[names[0]].weight, dl.lora_B[names[0]].weight
    s = dl.scaling[names[0]]

    def step(fn):
        def run():
            fn().backward(dy)

        return run

    fns = {
        "dlcore": step(lambda: dl(x)),
        "eager": step(lambda: ref.lora_linear_reference(x, base.weight, base.bias, a, b, s)),
        "base": _no_grad({"f": lambda: base(x)})["f"],
    }
    if peft_layer is not None:
        peft_layer.train()
        fns["peft"] = step(lambda: peft_layer(x))
    return fns


def _flops(tokens: int, extra: int = 1) -> int:
    return 2 * tokens * FEATURES * FEATURES * extra


CPU = ("cpu",)
GPU = ("cuda",)
CASES: list[harness.Case] = []
for _t, _goal in ((512, "<= 1.03x base (peft 1.10x)"), (8, "<= 1.05x base")):
    CASES.append(
        harness.Case(
            "lora",
            f"forward fp32 {FEATURES}->{FEATURES} r{RANK} {_t} tok",
            lambda d, t=_t: _forward_case(t, d, torch.float32),
            peer="peft",
            flops=_flops(_t),
            devices=CPU,
            goal=_goal,
        )
    )
for _t, _goal in (
    (8, "<= 1.10x base (peft 1.20x)"),
    (64, "<= 1.05x base"),
    (512, "<= 1.05x base (peft 1.06x)"),
):
    CASES.append(
        harness.Case(
            "lora",
            f"mixed 8 adapters fp32 {FEATURES}->{FEATURES} r{RANK} {_t} tok",
            lambda d, t=_t: _mixed_case(t, 8, d, torch.float32),
            peer="peft",
            flops=_flops(_t),
            devices=CPU,
            goal=_goal,
        )
    )
CASES.append(
    harness.Case(
        "lora",
        f"train fwd+bwd fp32 {FEATURES}->{FEATURES} r{RANK} 512 tok (base frozen)",
        lambda d: _train_case(512, d, torch.float32),
        peer="peft",
        flops=_flops(512),
        devices=CPU,
        goal="<= 1.08x base forward (peft 1.21x)",
    )
)
for _t in (16, 256, 4096):
    CASES += [
        harness.Case(
            "lora",
            f"forward bf16 {FEATURES}->{FEATURES} r{RANK} {_t} tok",
            lambda d, t=_t: _forward_case(t, d, torch.bfloat16),
            peer="peft",
            flops=_flops(_t),
            dtype=torch.bfloat16,
            devices=GPU,
            goal="<= 1.10x cuBLAS base GEMM",
        ),
        harness.Case(
            "lora",
            f"train fwd+bwd bf16 {FEATURES}->{FEATURES} r{RANK} {_t} tok",
            lambda d, t=_t: _train_case(t, d, torch.bfloat16),
            peer="peft",
            flops=_flops(_t),
            dtype=torch.bfloat16,
            devices=GPU,
            goal=">= 1.3x faster than peft",
        ),
        harness.Case(
            "lora",
            f"mixed 32 adapters bf16 {FEATURES}->{FEATURES} r{RANK} {_t} tok",
            lambda d, t=_t: _mixed_case(t, 32, d, torch.bfloat16),
            peer="peft",
            flops=_flops(_t),
            dtype=torch.bfloat16,
            devices=GPU,
            goal=">= 3x faster than peft adapter_names",
        ),
    ]

test_lora = harness.pytest_benchmark_test(CASES)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="LoRA cases as multiples of the base layer")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", help="substring of the case names to run")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(f"{harness.device_name(device)}, torch {torch.__version__}")
    for case in CASES:
        if device.type not in case.devices or (args.only and args.only not in case.name):
            continue
        if args.quick and not case.quick:
            continue
        fns = case.setup(device)
        samples = harness.time_interleaved_samples(
            fns,
            device,
            repeats=7 if args.quick else 15,
            sample_seconds=0.05,
            budget_seconds=8 if args.quick else 20,
        )
        times = {k: statistics.median(v) for k, v in samples.items()}
        base = times["base"]
        cols = "  ".join(
            f"{k} {v * 1e3:8.2f} ms ({harness.paired_ratio(samples, k, 'base'):.3f}x base)"
            for k, v in times.items()
            if k != "base"
        )
        print(f"{case.name:62s} base {base * 1e3:8.2f} ms  {cols}  goal: {case.goal}")
        del fns
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
