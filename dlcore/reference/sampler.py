"""Eager reference of the sampler family: DDIM / DDPM / DDIM-inversion steps with classifier-free
guidance, the executable specification of the fused kernels.

The arithmetic follows diffusers' ``DDIMScheduler.step``, ``DDPMScheduler.step``,
``DDIMInverseScheduler.step``, ``_threshold_sample`` and ``rescale_noise_cfg`` op for op (same
operations, same order, same operand dtypes), so with a float ``alpha`` or a 0-d tensor it is bit
for bit what diffusers computes. Per-sample alphas (shape ``(batch,)``) broadcast over the sample
dimensions. Everything works in float64 too (the parity tests' reference).

One deliberate difference: diffusers' DDPM ``fixed_large_log`` takes the square root of a
logarithm and so returns NaN; here its noise scale is ``exp(0.5 * log(beta_t))``, the variance
the name describes (the same value as ``fixed_large``).
"""

from __future__ import annotations

import math

import torch

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
VARIANCE_TYPES = (
    "fixed_small",
    "fixed_small_log",
    "fixed_large",
    "fixed_large_log",
    "learned",
    "learned_range",
)

_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_M32 = 0xFFFFFFFF


def philox_randn(seed: int, shape: tuple[int, ...], device: torch.device | str = "cpu"):
    """Standard normal float32 noise, element ``i`` (row-major) from Philox4x32-10 with counter
    ``(i mod 2**32, i >> 32, 0, 0)`` and key ``(seed mod 2**32, seed >> 32)``, turned Gaussian by
    Box-Muller on the first two words: exactly ``tl.randn(seed, i)`` of Triton, which the fused
    kernels of every backend implement (equal up to their log/cos rounding)."""
    n = math.prod(shape)
    idx = torch.arange(n, dtype=torch.int64, device=device)
    c0, c1 = idx & _M32, (idx >> 32) & _M32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(10):
        # 32x32 -> 64-bit products fit in int64 when split into 16-bit halves of the constant.
        p0 = _mul64(_PHILOX_ROUND_B, c2)
        p1 = _mul64(_PHILOX_ROUND_A, c0)
        c0, c2, c1, c3 = (
            ((p0 >> 32) ^ c1 ^ k0) & _M32,
            ((p1 >> 32) ^ c3 ^ k1) & _M32,
            p0 & _M32,
            p1 & _M32,
        )
        k0 = (k0 + _PHILOX_KEY_A) & _M32
        k1 = (k1 + _PHILOX_KEY_B) & _M32
    u1 = _uint_to_uniform(c0)
    u2 = _uint_to_uniform(c1)
    u1 = torch.clamp(u1, min=1.0e-7)
    r = torch.sqrt(-2.0 * torch.log(u1))
    return (r * torch.cos(6.283185307179586 * u2)).reshape(shape)


def _mul64(const: int, x: torch.Tensor) -> torch.Tensor:
    """Exact unsigned 32x32 -> 64-bit product as a non-negative int64 (x holds uint32 values)."""
    lo, hi = const & 0xFFFF, const >> 16
    a = x * lo  # < 2**48
    b = x * hi  # < 2**48
    low = a + ((b & 0xFFFF) << 16)
    return (((b >> 16) + (low >> 32)) << 32) | (low & _M32)


def _uint_to_uniform(x: torch.Tensor) -> torch.Tensor:
    # Triton: bitcast to int32, fold negatives with ~x, scale into [0, 1).
    signed = torch.where(x >= 2**31, x - 2**32, x)
    signed = torch.where(signed < 0, -signed - 1, signed)
    return signed.to(torch.float32) * 4.6566127342e-10


def _alpha(alpha, sample: torch.Tensor) -> torch.Tensor:
    """A float/0-d alpha as a 0-d tensor (float32, as diffusers' ``alphas_cumprod``; float64 for a
    float64 sample); a per-sample ``(batch,)`` alpha shaped to broadcast over the sample."""
    dtype = torch.float64 if sample.dtype == torch.float64 else torch.float32
    if not isinstance(alpha, torch.Tensor):
        return torch.tensor(alpha, dtype=dtype, device=sample.device)
    if alpha.dtype != torch.float64 and sample.dtype == torch.float64:
        alpha = alpha.to(torch.float64)
    alpha = alpha.to(sample.device)
    if alpha.dim() == 1:
        alpha = alpha.reshape(-1, *([1] * (sample.dim() - 1)))
    return alpha


def split_guidance(model_output, model_output_uncond, batch):
    """(cond, uncond): the two halves of a batch-concatenated output (diffusers' ``chunk(2)``
    order, unconditional first) or the two tensors as given."""
    if model_output_uncond is not None:
        return model_output, model_output_uncond
    uncond, cond = model_output.chunk(2)
    return cond, uncond


def guide(cond, uncond, guidance_scale, guidance_rescale=0.0):
    """Classifier-free guidance as diffusers' pipelines do it, then ``rescale_noise_cfg``."""
    noise_cfg = uncond + guidance_scale * (cond - uncond)
    if guidance_rescale > 0.0:
        dims = list(range(1, cond.ndim))
        std_text = cond.std(dim=dims, keepdim=True)
        std_cfg = noise_cfg.std(dim=dims, keepdim=True)
        noise_pred_rescaled = noise_cfg * (std_text / std_cfg)
        noise_cfg = guidance_rescale * noise_pred_rescaled + (1 - guidance_rescale) * noise_cfg
    return noise_cfg


def threshold_sample(sample, dynamic_thresholding_ratio, sample_max_value):
    """diffusers' ``_threshold_sample``: per-sample quantile of |x0|, clamp to [-s, s], divide."""
    dtype = sample.dtype
    batch_size, channels, *remaining_dims = sample.shape
    if dtype not in (torch.float32, torch.float64):
        sample = sample.float()
    sample = sample.reshape(batch_size, channels * math.prod(remaining_dims))
    abs_sample = sample.abs()
    s = torch.quantile(abs_sample, dynamic_thresholding_ratio, dim=1)
    s = torch.clamp(s, min=1, max=sample_max_value)
    s = s.unsqueeze(1)
    sample = torch.clamp(sample, -s, s) / s
    sample = sample.reshape(batch_size, channels, *remaining_dims)
    return sample.to(dtype)


def _guided_output(sample, model_output, model_output_uncond, guidance_scale, guidance_rescale):
    if guidance_scale is None:
        return model_output
    cond, uncond = split_guidance(model_output, model_output_uncond, sample.shape[0])
    return guide(cond, uncond, guidance_scale, guidance_rescale)


def _predict(sample, model_output, alpha_prod_t, beta_prod_t, prediction_type):
    if prediction_type == "epsilon":
        pred_original_sample = (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (
            0.5
        )
        pred_epsilon = model_output
    elif prediction_type == "sample":
        pred_original_sample = model_output
        pred_epsilon = (sample - alpha_prod_t ** (0.5) * pred_original_sample) / beta_prod_t ** (
            0.5
        )
    elif prediction_type == "v_prediction":
        pred_original_sample = (alpha_prod_t**0.5) * sample - (beta_prod_t**0.5) * model_output
        pred_epsilon = (alpha_prod_t**0.5) * model_output + (beta_prod_t**0.5) * sample
    else:
        raise ValueError(
            f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}"
        )
    return pred_original_sample, pred_epsilon


def _clip(x0, clip_sample, clip_sample_range, thresholding, ratio, sample_max_value):
    if thresholding:
        return threshold_sample(x0, ratio, sample_max_value)
    if clip_sample:
        return x0.clamp(-clip_sample_range, clip_sample_range)
    return x0


def ddim_step(
    sample,
    model_output,
    alpha_prod_t,
    alpha_prod_t_prev,
    *,
    eta=0.0,
    noise=None,
    prediction_type="epsilon",
    clip_sample=False,
    clip_sample_range=1.0,
    thresholding=False,
    dynamic_thresholding_ratio=0.995,
    sample_max_value=1.0,
    use_clipped_model_output=False,
    model_output_uncond=None,
    guidance_scale=None,
    guidance_rescale=0.0,
):
    """DDIMScheduler.step given the two alphas; ``noise`` is diffusers' ``variance_noise``."""
    model_output = _guided_output(
        sample, model_output, model_output_uncond, guidance_scale, guidance_rescale
    )
    alpha_prod_t = _alpha(alpha_prod_t, sample)
    alpha_prod_t_prev = _alpha(alpha_prod_t_prev, sample)
    beta_prod_t = 1 - alpha_prod_t
    pred_original_sample, pred_epsilon = _predict(
        sample, model_output, alpha_prod_t, beta_prod_t, prediction_type
    )
    pred_original_sample = _clip(
        pred_original_sample,
        clip_sample,
        clip_sample_range,
        thresholding,
        dynamic_thresholding_ratio,
        sample_max_value,
    )
    beta_prod_t_prev = 1 - alpha_prod_t_prev
    variance = (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
    std_dev_t = eta * variance ** (0.5)
    if use_clipped_model_output:
        pred_epsilon = (sample - alpha_prod_t ** (0.5) * pred_original_sample) / beta_prod_t ** (
            0.5
        )
    pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** (0.5) * pred_epsilon
    prev_sample = alpha_prod_t_prev ** (0.5) * pred_original_sample + pred_sample_direction
    if eta > 0 and noise is not None:
        prev_sample = prev_sample + std_dev_t * noise
    return prev_sample.to(sample.dtype), pred_original_sample.to(sample.dtype)


def ddim_inversion_step(
    sample,
    model_output,
    alpha_prod_t,
    alpha_prod_t_next,
    *,
    prediction_type="epsilon",
    clip_sample=False,
    clip_sample_range=1.0,
    thresholding=False,
    dynamic_thresholding_ratio=0.995,
    sample_max_value=1.0,
    model_output_uncond=None,
    guidance_scale=None,
    guidance_rescale=0.0,
):
    """DDIMInverseScheduler.step: x_{t+1} from x_t (``alpha_prod_t_next`` is the noisier one)."""
    model_output = _guided_output(
        sample, model_output, model_output_uncond, guidance_scale, guidance_rescale
    )
    alpha_prod_t = _alpha(alpha_prod_t, sample)
    alpha_prod_t_prev = _alpha(alpha_prod_t_next, sample)
    beta_prod_t = 1 - alpha_prod_t
    pred_original_sample, pred_epsilon = _predict(
        sample, model_output, alpha_prod_t, beta_prod_t, prediction_type
    )
    pred_original_sample = _clip(
        pred_original_sample,
        clip_sample,
        clip_sample_range,
        thresholding,
        dynamic_thresholding_ratio,
        sample_max_value,
    )
    pred_sample_direction = (1 - alpha_prod_t_prev) ** (0.5) * pred_epsilon
    prev_sample = alpha_prod_t_prev ** (0.5) * pred_original_sample + pred_sample_direction
    return prev_sample.to(sample.dtype), pred_original_sample.to(sample.dtype)


def ddpm_variance(alpha_prod_t, alpha_prod_t_prev, variance_type, predicted_variance=None):
    """DDPMScheduler._get_variance given the alphas (see the module note on fixed_large_log)."""
    current_beta_t = 1 - alpha_prod_t / alpha_prod_t_prev
    variance = (1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * current_beta_t
    variance = torch.clamp(variance, min=1e-20)
    if variance_type == "fixed_small":
        return variance
    if variance_type == "fixed_small_log":
        return torch.exp(0.5 * torch.log(variance))
    if variance_type == "fixed_large":
        return current_beta_t
    if variance_type == "fixed_large_log":
        return torch.log(current_beta_t)
    if variance_type == "learned":
        return predicted_variance
    if variance_type == "learned_range":
        min_log = torch.log(variance)
        max_log = torch.log(current_beta_t)
        frac = (predicted_variance + 1) / 2
        return frac * max_log + (1 - frac) * min_log
    raise ValueError(f"variance_type must be one of {VARIANCE_TYPES}, got {variance_type!r}")


def ddpm_step(
    sample,
    model_output,
    alpha_prod_t,
    alpha_prod_t_prev,
    *,
    noise=None,
    add_noise=True,
    variance_type="fixed_small",
    prediction_type="epsilon",
    clip_sample=False,
    clip_sample_range=1.0,
    thresholding=False,
    dynamic_thresholding_ratio=0.995,
    sample_max_value=1.0,
    model_output_uncond=None,
    guidance_scale=None,
    guidance_rescale=0.0,
):
    """DDPMScheduler.step given the two alphas. ``add_noise`` (bool or per-sample bool tensor)
    is diffusers' ``t > 0``; learned variance types take the 2C-channel model output."""
    channels = sample.shape[1]
    predicted_variance = None
    if variance_type in ("learned", "learned_range"):
        model_output, predicted_variance = torch.split(model_output, channels, dim=1)
        if model_output_uncond is not None:
            model_output_uncond = torch.split(model_output_uncond, channels, dim=1)[0]
        elif guidance_scale is not None:
            # Guide the epsilon channels; the variance comes from the conditional half.
            predicted_variance = predicted_variance.chunk(2)[1]
    model_output = _guided_output(
        sample, model_output, model_output_uncond, guidance_scale, guidance_rescale
    )
    alpha_prod_t = _alpha(alpha_prod_t, sample)
    alpha_prod_t_prev = _alpha(alpha_prod_t_prev, sample)
    beta_prod_t = 1 - alpha_prod_t
    beta_prod_t_prev = 1 - alpha_prod_t_prev
    current_alpha_t = alpha_prod_t / alpha_prod_t_prev
    current_beta_t = 1 - current_alpha_t
    pred_original_sample, _ = _predict(
        sample, model_output, alpha_prod_t, beta_prod_t, prediction_type
    )
    pred_original_sample = _clip(
        pred_original_sample,
        clip_sample,
        clip_sample_range,
        thresholding,
        dynamic_thresholding_ratio,
        sample_max_value,
    )
    pred_original_sample_coeff = (alpha_prod_t_prev ** (0.5) * current_beta_t) / beta_prod_t
    current_sample_coeff = current_alpha_t ** (0.5) * beta_prod_t_prev / beta_prod_t
    pred_prev_sample = pred_original_sample_coeff * pred_original_sample + current_sample_coeff * (
        sample
    )
    if noise is not None and (isinstance(add_noise, torch.Tensor) or add_noise):
        var = ddpm_variance(alpha_prod_t, alpha_prod_t_prev, variance_type, predicted_variance)
        if variance_type in ("fixed_small_log",):
            variance = var * noise
        elif variance_type in ("learned_range", "fixed_large_log"):
            variance = torch.exp(0.5 * var) * noise
        else:
            variance = (var**0.5) * noise
        if isinstance(add_noise, torch.Tensor):
            mask = add_noise.to(device=sample.device, dtype=variance.dtype)
            variance = variance * mask.reshape(-1, *([1] * (sample.dim() - 1)))
        pred_prev_sample = pred_prev_sample + variance
    return pred_prev_sample.to(sample.dtype), pred_original_sample.to(sample.dtype)
