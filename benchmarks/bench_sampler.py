"""Sampler step benchmarks: dlcore's fused scheduler step vs diffusers' ``step`` (plus the
pipeline's classifier-free-guidance combination ``u + s * (c - u)`` where guidance is on) vs the
eager reference (``dlcore.backend("eager")``), all doing the same step on the same inputs.

``bytes_moved`` counts each input read once and each output written once (sample, the model
output(s), the noise tensor when one is read, prev_sample and pred_original_sample).
"""

from __future__ import annotations

import torch

import dlcore
from dlcore.schedulers import DDIMScheduler, DDPMScheduler

from . import harness

# Stable Diffusion's scheduler configuration.
SD_CONFIG = dict(
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)
GUIDANCE = 7.5


def _diffusers():
    try:
        import diffusers
    except ImportError:
        return None
    return diffusers


def _nbytes(shape, dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


def _step_case(name, kind, shape, dtype, *, cfg, noise, devices, quick=True, goal=""):
    """kind: "ddim" (eta=0, the SD default) or "ddpm"; noise: None, "generator" or "fused"."""
    tensors = 2 + (1 if cfg else 0) + 2 + (1 if noise == "generator" else 0)

    def setup(device: torch.device):
        torch.manual_seed(0)
        ours_cls = DDIMScheduler if kind == "ddim" else DDPMScheduler
        ours = ours_cls.from_config(SD_CONFIG)
        ours.set_timesteps(50, device=device)
        t = ours.timesteps[10]
        latents = torch.randn(shape, device=device, dtype=dtype)
        mo_shape = (2 * shape[0], *shape[1:]) if cfg else shape
        noise_pred = torch.randn(mo_shape, device=device, dtype=dtype)
        out = (torch.empty_like(latents), torch.empty_like(latents))
        guidance = dict(guidance_scale=GUIDANCE) if cfg else {}
        extra = {}
        if noise == "fused":
            extra = dict(variance_noise="fused", seed=1234)

        def gen():
            return torch.Generator(device=device).manual_seed(0)

        def dlcore_step(backend=None):
            kw = dict(extra)
            if noise == "generator":
                kw["generator"] = gen()
            with dlcore.backend(backend):
                return ours.step(
                    noise_pred, t, latents, return_dict=False, out=out if backend is None else None,
                    **guidance, **kw,
                )  # fmt: skip

        fns = {"dlcore": dlcore_step, "eager": lambda: dlcore_step("eager")}
        diffusers = _diffusers()
        if diffusers is not None:
            theirs_cls = diffusers.DDIMScheduler if kind == "ddim" else diffusers.DDPMScheduler
            theirs = theirs_cls.from_config(SD_CONFIG)
            theirs.set_timesteps(50, device=device)
            theirs.alphas_cumprod = theirs.alphas_cumprod.to(device)

            def diffusers_step():
                mo = noise_pred
                if cfg:
                    uncond, text = mo.chunk(2)
                    mo = uncond + GUIDANCE * (text - uncond)
                kw = {"generator": gen()} if noise is not None else {}
                return theirs.step(mo, t, latents, return_dict=False, **kw)

            fns["diffusers"] = diffusers_step
        return fns

    return harness.Case(
        family="sampler",
        name=name,
        setup=setup,
        peer="diffusers",
        bytes_moved=tensors * _nbytes(shape, dtype),
        dtype=dtype,
        devices=devices,
        quick=quick,
        goal=goal,
    )


SD = (8, 4, 64, 64)
LARGE_CPU = (16, 4, 512, 512)  # 64 MiB per fp32 tensor
LARGE_GPU = (64, 4, 512, 512)  # 256 MiB per fp32 tensor

CASES = [
    _step_case("ddim-cfg-8x4x64x64-fp32", "ddim", SD, torch.float32, cfg=True, noise=None,
               devices=("cpu",), goal=">= 3x diffusers step + CFG"),
    _step_case("ddpm-cfg-8x4x64x64-fp32-generator", "ddpm", SD, torch.float32, cfg=True,
               noise="generator", devices=("cpu",)),
    _step_case("ddpm-cfg-8x4x64x64-fp32-fused-noise", "ddpm", SD, torch.float32, cfg=True,
               noise="fused", devices=("cpu",)),
    _step_case("ddim-16x4x512x512-fp32-64MiB", "ddim", LARGE_CPU, torch.float32, cfg=False,
               noise=None, devices=("cpu",), goal=">= 70% copy bandwidth"),
    _step_case("ddim-cfg-16x4x512x512-fp32-64MiB", "ddim", LARGE_CPU, torch.float32, cfg=True,
               noise=None, devices=("cpu",), quick=False, goal=">= 70% copy bandwidth"),
    _step_case("ddpm-16x4x512x512-fp32-64MiB-fused-noise", "ddpm", LARGE_CPU, torch.float32,
               cfg=False, noise="fused", devices=("cpu",), quick=False),
    _step_case("ddim-cfg-8x4x64x64-fp32", "ddim", SD, torch.float32, cfg=True, noise=None,
               devices=("cuda",), goal=">= 5x diffusers step + CFG"),
    _step_case("ddim-cfg-8x4x64x64-fp16", "ddim", SD, torch.float16, cfg=True, noise=None,
               devices=("cuda",), goal=">= 5x diffusers step + CFG"),
    _step_case("ddpm-cfg-8x4x64x64-fp16-fused-noise", "ddpm", SD, torch.float16, cfg=True,
               noise="fused", devices=("cuda",)),
    _step_case("ddim-64x4x512x512-fp32-256MiB", "ddim", LARGE_GPU, torch.float32, cfg=False,
               noise=None, devices=("cuda",), goal=">= 85% HBM copy bandwidth"),
    _step_case("ddim-cfg-64x4x512x512-bf16", "ddim", LARGE_GPU, torch.bfloat16, cfg=True,
               noise=None, devices=("cuda",), goal=">= 85% HBM copy bandwidth"),
]  # fmt: skip

test_sampler = harness.pytest_benchmark_test(CASES)
