"""Triton kernels of the sampler family: the fused DDIM/DDPM/inversion step (+ classifier-free
guidance) and the guidance-rescale statistics. Contract: dlcore/ops/sampler.py; the per-sample
coefficients are those of csrc/sampler_math.h.

Launch grid: (blocks of one sample's elements, batch). Every program computes its sample's
coefficients from the (batch,) alpha tensors itself, so a step is one launch with no host work
beyond it.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from .aot import Spec, max_registers

BLOCK = 1024
STATS_CHUNK = 4096  # dlcore/ops/sampler.py STATS_CHUNK
NUM_WARPS = 4


@triton.jit
def sampler_step_kernel(
    x_ptr, m_ptr, u_ptr, noise_ptr, var_ptr, at_ptr, ap_ptr, factor_ptr, thr_ptr, mask_ptr,
    prev_ptr, x0_ptr, n, stride_x, stride_m, stride_u, stride_noise, stride_var, stride_at,
    stride_ap, stride_factor, stride_thr, stride_mask, stride_prev, stride_x0, method, prediction,
    variance_type, clip_mode, clip_range, eta, use_clipped, guidance_scale, seed, has_factor,
    has_mask,
    HAS_UNCOND: tl.constexpr, NOISE_MODE: tl.constexpr, SIGMA_MODE: tl.constexpr,
    ABS_ONLY: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n

    # Per-sample coefficients (csrc/sampler_math.h step_coeffs), fp32.
    a = tl.load(at_ptr + b * stride_at)
    ap = tl.load(ap_ptr + b * stride_ap)
    sa = tl.sqrt(a)
    sb = tl.sqrt(1.0 - a)
    ax = tl.where(prediction == 0, 1.0 / sa, tl.where(prediction == 1, 0.0, sa))
    am = tl.where(prediction == 0, -sb / sa, tl.where(prediction == 1, 1.0, -sb))
    ex = tl.where(prediction == 0, 0.0, tl.where(prediction == 1, 1.0 / sb, sb))
    em = tl.where(prediction == 0, 1.0, tl.where(prediction == 1, -sa / sb, sa))
    e0 = 0.0
    # DDIM / inversion
    variance = (1.0 - ap) / (1.0 - a) * (1.0 - a / ap)
    std_dev = tl.where(method == 0, eta * tl.sqrt(variance), 0.0)
    clipped = use_clipped != 0
    ex = tl.where(clipped, 1.0 / sb, ex)
    em = tl.where(clipped, 0.0, em)
    e0 = tl.where(clipped, -sa / sb, e0)
    ceps = tl.sqrt(1.0 - ap - std_dev * std_dev)
    # DDPM
    cur_alpha = a / ap
    cur_beta = 1.0 - cur_alpha
    ddpm_var = tl.maximum((1.0 - ap) / (1.0 - a) * cur_beta, 1e-20)
    large = (variance_type == 2) | (variance_type == 3)
    ddpm = method == 1
    p0 = tl.where(ddpm, tl.sqrt(ap) * cur_beta / (1.0 - a), tl.sqrt(ap) + ceps * e0)
    px = tl.where(ddpm, tl.sqrt(cur_alpha) * (1.0 - ap) / (1.0 - a), ceps * ex)
    pg = tl.where(ddpm, 0.0, ceps * em)
    sigma = tl.where(ddpm, tl.where(large, tl.sqrt(cur_beta), tl.sqrt(ddpm_var)), std_dev)
    min_log = tl.log(ddpm_var)
    half_range = 0.25 * (tl.log(cur_beta) - min_log)
    l0 = 0.5 * min_log + half_range

    x = tl.load(x_ptr + b * stride_x + offs, mask=inb, other=0.0).to(tl.float32)
    g = tl.load(m_ptr + b * stride_m + offs, mask=inb, other=0.0).to(tl.float32)
    if HAS_UNCOND:
        u = tl.load(u_ptr + b * stride_u + offs, mask=inb, other=0.0).to(tl.float32)
        factor = 1.0
        if has_factor:
            factor = tl.load(factor_ptr + b * stride_factor)
        g = (u + guidance_scale * (g - u)) * factor
    x0 = ax * x + am * g
    if ABS_ONLY:
        tl.store(x0_ptr + b * stride_x0 + offs, tl.abs(x0).to(x0_ptr.dtype.element_ty), mask=inb)
    else:
        if clip_mode == 1:
            x0 = tl.minimum(tl.maximum(x0, -clip_range), clip_range)
        if clip_mode == 2:
            s = tl.load(thr_ptr + b * stride_thr)
            x0 = tl.minimum(tl.maximum(x0, -s), s) / s
        prev = p0 * x0 + px * x + pg * g
        if NOISE_MODE != 0:
            if NOISE_MODE == 1:
                nz = tl.load(noise_ptr + b * stride_noise + offs, mask=inb, other=0.0)
                nz = nz.to(tl.float32)
            else:
                nz = tl.randn(seed, b * n + offs)
            keep = 1.0
            if has_mask:
                keep = tl.load(mask_ptr + b * stride_mask)
            if SIGMA_MODE == 0:
                prev += (sigma * keep) * nz
            else:
                v = tl.load(var_ptr + b * stride_var + offs, mask=inb, other=0.0).to(tl.float32)
                if SIGMA_MODE == 1:
                    prev += tl.sqrt(v) * nz * keep
                else:
                    prev += tl.exp(l0 + half_range * v) * nz * keep
        tl.store(prev_ptr + b * stride_prev + offs, prev.to(prev_ptr.dtype.element_ty), mask=inb)
        tl.store(x0_ptr + b * stride_x0 + offs, x0.to(x0_ptr.dtype.element_ty), mask=inb)


@triton.jit
def sampler_cfg_stats_kernel(
    c_ptr, u_ptr, out_ptr, n, stride_c, stride_u, guidance_scale, num_chunks,
    CHUNK: tl.constexpr,
):  # fmt: skip
    p = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs = p * CHUNK + tl.arange(0, CHUNK)
    inb = offs < n
    c = tl.load(c_ptr + b * stride_c + offs, mask=inb, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + b * stride_u + offs, mask=inb, other=0.0).to(tl.float32)
    g = tl.where(inb, u + guidance_scale * (c - u), 0.0)
    count = tl.minimum(n - p * CHUNK, CHUNK).to(tl.float32)
    sc = tl.sum(c, axis=0)
    sg = tl.sum(g, axis=0)
    dc = tl.where(inb, c - sc / count, 0.0)
    dg = tl.where(inb, g - sg / count, 0.0)
    base = out_ptr + (b * num_chunks + p) * 4
    tl.store(base, sc)
    tl.store(base + 1, tl.sum(dc * dc, axis=0))
    tl.store(base + 2, sg)
    tl.store(base + 3, tl.sum(dg * dg, axis=0))


_SIGMA_MODES = {4: 1, 5: 2}  # variance_type learned -> sqrt(v), learned_range -> exp(...)


def sampler_step(
    sample, model_output, uncond, noise, variance_pred, alpha_t, alpha_prev, cfg_factor,
    threshold, noise_mask, method, prediction_type, variance_type, clip_mode, clip_range, eta,
    use_clipped_model_output, guidance_scale, seed, noise_mode, abs_x0_only, prev_sample,
    pred_original_sample,
):  # fmt: skip
    """Launcher with the argument order of the C++ ``sampler_step_kernel``."""
    batch, n = sample.shape
    if batch == 0 or n == 0:
        return
    sigma_mode = _SIGMA_MODES.get(variance_type, 0) if noise_mode else 0

    def ptr(t):
        return sample if t is None else t

    def stride(t):
        return 0 if t is None else t.stride(0)

    grid = (triton.cdiv(n, BLOCK), batch)
    sampler_step_kernel[grid](
        sample, model_output, ptr(uncond), ptr(noise), ptr(variance_pred), alpha_t, alpha_prev,
        ptr(cfg_factor), ptr(threshold), ptr(noise_mask), ptr(prev_sample), pred_original_sample,
        n, sample.stride(0), model_output.stride(0), stride(uncond), stride(noise),
        stride(variance_pred), alpha_t.stride(0), alpha_prev.stride(0), stride(cfg_factor),
        stride(threshold), stride(noise_mask), stride(prev_sample),
        pred_original_sample.stride(0), method, prediction_type, variance_type, clip_mode,
        float(clip_range), float(eta), int(use_clipped_model_output), float(guidance_scale),
        int(seed), int(cfg_factor is not None), int(noise_mask is not None),
        HAS_UNCOND=uncond is not None, NOISE_MODE=noise_mode, SIGMA_MODE=sigma_mode,
        ABS_ONLY=bool(abs_x0_only), BLOCK=BLOCK, num_warps=NUM_WARPS,
        maxnreg=max_registers(NUM_WARPS),
    )  # fmt: skip


def sampler_cfg_stats(cond, uncond, guidance_scale, partial):
    """Launcher with the argument order of the C++ ``sampler_cfg_stats_kernel``."""
    batch, n = cond.shape
    chunks = partial.shape[1]
    sampler_cfg_stats_kernel[(chunks, batch)](
        cond, uncond, partial, n, cond.stride(0), uncond.stride(0), float(guidance_scale), chunks,
        CHUNK=STATS_CHUNK, num_warps=8, maxnreg=max_registers(8),
    )  # fmt: skip


# ---------------------------------------------------------------- ahead-of-time variants

_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
# (NOISE_MODE, SIGMA_MODE) pairs the launcher can produce: learned sigmas only come with noise.
_NOISE_SIGMA = [(0, 0), (1, 0), (2, 0), (1, 1), (1, 2), (2, 1), (2, 2)]


def _step_signature(ptr: str) -> dict[str, str]:
    sig = {}
    for name in ("x", "m", "u", "noise", "var"):
        sig[f"{name}_ptr"] = ptr
    for name in ("at", "ap", "factor", "thr", "mask"):
        sig[f"{name}_ptr"] = "*fp32"
    sig["prev_ptr"] = ptr
    sig["x0_ptr"] = ptr
    sig["n"] = "i32"
    for name in ("x", "m", "u", "noise", "var", "at", "ap", "factor", "thr", "mask", "prev", "x0"):
        sig[f"stride_{name}"] = "i64"
    for name in ("method", "prediction", "variance_type", "clip_mode"):
        sig[name] = "i32"
    for name in ("clip_range", "eta"):
        sig[name] = "fp32"
    sig["use_clipped"] = "i32"
    sig["guidance_scale"] = "fp32"
    sig["seed"] = "i64"
    sig["has_factor"] = "i32"
    sig["has_mask"] = "i32"
    for name in ("HAS_UNCOND", "NOISE_MODE", "SIGMA_MODE", "ABS_ONLY", "BLOCK"):
        sig[name] = "constexpr"
    return sig


def _aot_specs() -> list[Spec]:
    specs = []
    for ptr in _TYPES.values():
        short = ptr[1:]
        variants = [
            (uncond, noise, sigma, False)
            for uncond, (noise, sigma) in itertools.product((False, True), _NOISE_SIGMA)
        ] + [(uncond, 0, 0, True) for uncond in (False, True)]
        for uncond, noise, sigma, abs_only in variants:
            specs.append(
                Spec(
                    sampler_step_kernel,
                    _step_signature(ptr),
                    dict(
                        HAS_UNCOND=uncond,
                        NOISE_MODE=noise,
                        SIGMA_MODE=sigma,
                        ABS_ONLY=abs_only,
                        BLOCK=BLOCK,
                    ),  # fmt: skip
                    num_warps=NUM_WARPS,
                    maxnreg=max_registers(NUM_WARPS),
                    label=f"{short} cfg={int(uncond)} noise={noise} sigma={sigma}"
                    + (" abs" if abs_only else ""),
                )
            )
        specs.append(
            Spec(
                sampler_cfg_stats_kernel,
                {
                    "c_ptr": ptr,
                    "u_ptr": ptr,
                    "out_ptr": "*fp32",
                    "n": "i32",
                    "stride_c": "i64",
                    "stride_u": "i64",
                    "guidance_scale": "fp32",
                    "num_chunks": "i32",
                    "CHUNK": "constexpr",
                },  # fmt: skip
                dict(CHUNK=STATS_CHUNK),
                num_warps=8,
                maxnreg=max_registers(8),
                label=short,
            )
        )
    return specs


AOT_SPECS = _aot_specs()
