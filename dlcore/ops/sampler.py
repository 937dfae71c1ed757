"""Fused sampler step ops: ``dlcore.ddim_step``, ``dlcore.ddpm_step``,
``dlcore.ddim_inversion_step``.

The public functions validate inputs (errors name the argument), resolve noise (tensor, torch
generator, global RNG, or ``noise="fused"`` with a seed), split classifier-free-guidance inputs,
then call one registered custom op, ``dlcore::sampler_step`` (fake impl included, so
torch.compile(fullgraph=True), meta tensors and opcheck work). Its body runs the kernel layer of
the chosen backend in at most three passes: the guidance-rescale statistics (only when
``guidance_rescale > 0``), the per-sample |x0| quantile (only with ``thresholding``), and the one
fused pass that writes both outputs.

Kernel contract (C++ ops declared in csrc/dlcore.cpp; the Triton launchers
``dlcore.kernels.sampler.sampler_step / sampler_cfg_stats`` take the same arguments in order)::

  sampler_step_kernel(sample, model_output, uncond?, noise?, variance_pred?, alpha_t, alpha_prev,
                      cfg_factor?, threshold?, noise_mask?, method, prediction_type,
                      variance_type, clip_mode, clip_range, eta, use_clipped_model_output,
                      guidance_scale, seed, noise_mode, abs_x0_only, prev_sample!,
                      pred_original_sample!)
    Tensors are rows (batch, n), unit inner stride, any batch stride (the C++ cpu kernels also
    take (batch, ...) tensors whose samples are contiguous, as they are), all one dtype
    (fp32/fp16/bf16); math in fp32. alpha_t, alpha_prev, cfg_factor, threshold, noise_mask are
    float32 (batch,) (any stride, 0 broadcasts). method 0 DDIM, 1 DDPM, 2 DDIM inversion;
    prediction 0 epsilon, 1 sample, 2 v_prediction; variance_type indexes VARIANCE_TYPES;
    clip_mode 0 none, 1 clamp to clip_range, 2 clamp to threshold[b] then divide by it;
    noise_mode 0 none, 1 the noise rows, 2 tl.randn(seed, b * n + i) (Philox4x32-10).
    g = (uncond + guidance_scale * (model_output - uncond)) * cfg_factor[b]  (g = model_output
    without uncond), then the per-sample linear step of csrc/sampler_math.h. abs_x0_only writes
    |x0| (before clipping) to pred_original_sample and nothing else (the quantile pass).
  sampler_cfg_stats_kernel(cond, uncond, guidance_scale, partial!)
    partial (batch, ceil(n / STATS_CHUNK), 4) float32: per chunk of STATS_CHUNK elements, sum and
    centred sum of squares of cond and of the guided output.
  sampler_quantile_kernel(scratch!, ratio, min_value, max_value, out!)   (CPU)
    out[b] = clamp(torch.quantile(scratch[b], ratio), min_value, max_value); scratch may be
    permuted.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from collections.abc import Sequence

import torch

from .. import _ext
from ..backends import forced_backend, select, triton_kernels
from ..check import Case
from ..reference import sampler as ref
from ..reference.sampler import PREDICTION_TYPES, VARIANCE_TYPES
from .common import FLOAT_DTYPES

Tensor = torch.Tensor
STATS_CHUNK = 4096  # csrc/cpu/sampler.cpp, csrc/cuda/sampler.cu and kernels/sampler.py agree
_METHODS = {"ddim": 0, "ddpm": 1, "ddim_inversion": 2}
_METHOD_NAMES = {v: k for k, v in _METHODS.items()}
_LEARNED = ("learned", "learned_range")


def _has_kernel(op: str, key: str) -> bool:
    return _ext.CPU_EXT_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(
        f"dlcore::{op}", key
    )


@functools.cache
def _triton():
    try:
        return triton_kernels("sampler")
    except ImportError:
        return None


def _implemented() -> tuple[str, ...]:
    names = []
    if _has_kernel("sampler_step_kernel", "CUDA"):
        names.append("cuda")
    if _has_kernel("sampler_step_kernel", "CPU"):
        names.append("cpu")
    if importlib.util.find_spec("triton") is not None:
        names.append("triton")
    return (*names, "eager")


# Fixed once the extensions are loaded; a constant so torch.compile traces no registry queries.
IMPLEMENTED = _implemented()


def implemented() -> tuple[str, ...]:
    """The backends this family implements in this build."""
    return IMPLEMENTED


_SELECTED: dict[tuple[str | None, str], str] = {}


def _select(method: str, device: torch.device) -> str:
    """``backends.select``, memoised per (forced backend, device type): availability does not
    change while the process runs, and a step is short enough for the lookup to matter."""
    key = (forced_backend(), device.type)
    if key not in _SELECTED:
        _SELECTED[key] = select(f"dlcore.{method}_step", device, IMPLEMENTED)
    return _SELECTED[key]


# ---------------------------------------------------------------- kernel layer glue


def _rows(t: Tensor, batch: int) -> Tensor:
    """(batch, n) view with unit inner stride; copies only when a sample is not contiguous."""
    r = t.reshape(batch, -1)
    if r.shape[1] > 1 and r.stride(1) != 1:
        r = t.contiguous().reshape(batch, -1)
    return r


def _samples(t: Tensor, batch: int) -> Tensor:
    """For the cpu kernels, which take (batch, ...) tensors whose samples are contiguous as they
    are: ``t`` itself, or a contiguous copy (no view to build on the common path)."""
    return t if t.is_contiguous() or _per_sample_contiguous(t) else t.contiguous()


def _writable_rows(t: Tensor, batch: int, keep_shape: bool) -> tuple[Tensor, bool]:
    """Rows that alias ``t`` when possible (``t`` itself with ``keep_shape``), else a scratch to
    copy back (returned flag)."""
    if t.is_contiguous() or _per_sample_contiguous(t):
        return (t if keep_shape else t.view(batch, -1)), False
    return torch.empty((batch, t[0].numel()), dtype=t.dtype, device=t.device), True


def _per_sample_contiguous(t: Tensor) -> bool:
    expected = 1
    for size, stride in zip(reversed(t.shape[1:]), reversed(t.stride()[1:]), strict=True):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _span(t: Tensor) -> tuple[int, int]:
    """[first, last) byte addresses a tensor can touch (empty when it has no elements)."""
    lo = t.data_ptr()
    if t.is_contiguous():  # the common case, without walking the strides in Python
        return lo, lo + t.nbytes
    if t.numel() == 0:
        return lo, lo
    extent = sum((s - 1) * st for s, st in zip(t.shape, t.stride(), strict=True)) + 1
    return lo, lo + extent * t.element_size()


def _spans_meet(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1] and a[0] < a[1] and b[0] < b[1]


def _overlaps(a: Tensor, b: Tensor) -> bool:
    """Whether the memory spans of two tensors intersect."""
    return a.device == b.device and _spans_meet(_span(a), _span(b))


def _rescale_factor(partial: Tensor, n: int, guidance_rescale: float) -> Tensor:
    """rescale_noise_cfg's per-sample factor gr * std(cond) / std(guided) + (1 - gr), merged
    from the kernels' chunk statistics (Chan et al.), in float64."""
    p = partial.double()
    counts = torch.full((p.shape[1],), float(STATS_CHUNK), dtype=torch.float64, device=p.device)
    counts[-1] = n - STATS_CHUNK * (p.shape[1] - 1)

    def std(s, q):
        mean = s.sum(1, keepdim=True) / n
        m2 = q.sum(1) + (counts * (s / counts - mean) ** 2).sum(1)
        return torch.sqrt(m2 / (n - 1))

    ratio = std(p[..., 0], p[..., 1]) / std(p[..., 2], p[..., 3])
    return (guidance_rescale * ratio + (1.0 - guidance_rescale)).float()


def _quantile_rows(rows: Tensor, q: float) -> Tensor:
    """torch.quantile(rows, q, dim=1) (linear interpolation) by two selections, in float32:
    no sort, and no 2**24-element limit."""
    n = rows.shape[1]
    pos = q * (n - 1)
    below = min(int(math.floor(pos)), n - 1)
    above = min(below + 1, n - 1)
    lo = rows.kthvalue(below + 1, dim=1).values.float()
    hi = rows.kthvalue(above + 1, dim=1).values.float() if above != below else lo
    return torch.lerp(lo, hi, pos - below)


@functools.cache
def _kernels(backend: str):
    """(step, cfg_stats, quantile) of a kernel backend."""
    if backend == "triton":
        k = _triton()
        return k.sampler_step, k.sampler_cfg_stats, None
    ops = torch.ops.dlcore
    quantile = ops.sampler_quantile_kernel if backend == "cpu" else None
    return ops.sampler_step_kernel, ops.sampler_cfg_stats_kernel, quantile


def _run_kernels(
    backend, sample, model_output, uncond, noise, alpha_t, alpha_prev, noise_mask, method,
    prediction_type, variance_type, clip_mode, clip_range, threshold_ratio, sample_max_value,
    eta, use_clipped_model_output, guidance_scale, guidance_rescale, seed, noise_mode,
    prev_sample, pred_original_sample,
):  # fmt: skip
    step, cfg_stats, quantile = _kernels(backend)
    batch = sample.shape[0]
    n = sample.numel() // batch
    channels = sample.shape[1] if sample.dim() > 1 else 1
    cpu = backend == "cpu"
    rows = _samples if cpu else _rows
    x = rows(sample, batch)
    variance_pred = None
    if VARIANCE_TYPES[variance_type] in _LEARNED:
        variance_pred = rows(model_output[:, channels:], batch)
        model_output = model_output[:, :channels]
        uncond = uncond[:, :channels] if uncond is not None else None
    m = rows(model_output, batch)
    u = rows(uncond, batch) if uncond is not None else None
    nz = rows(noise, batch) if noise_mode == 1 else None
    prev, copy_prev = _writable_rows(prev_sample, batch, cpu)
    x0, copy_x0 = _writable_rows(pred_original_sample, batch, cpu)
    factor = None
    if u is not None and guidance_rescale > 0.0:
        partial = torch.empty(
            (batch, max(1, math.ceil(n / STATS_CHUNK)), 4), dtype=torch.float32, device=x.device
        )
        cfg_stats(m, u, guidance_scale, partial)
        factor = _rescale_factor(partial, n, guidance_rescale)
    threshold = None
    if clip_mode == 2:
        inputs = [t for t in (x, m, u, nz, variance_pred) if t is not None]
        scratch = x0
        if any(_overlaps(scratch, t) for t in inputs):
            scratch = torch.empty_like(x)  # pred_original_sample aliases an input
        step(
            x, m, u, None, None, alpha_t, alpha_prev, factor, None, None, method,
            prediction_type, variance_type, 0, clip_range, eta, use_clipped_model_output,
            guidance_scale, seed, 0, True, prev, scratch,
        )  # fmt: skip
        if quantile is not None:
            threshold = torch.empty(batch, dtype=torch.float32, device=x.device)
            quantile(scratch, threshold_ratio, 1.0, sample_max_value, threshold)
        else:
            threshold = _quantile_rows(scratch, threshold_ratio).clamp(1.0, sample_max_value)
    step(
        x, m, u, nz, variance_pred, alpha_t, alpha_prev, factor, threshold, noise_mask, method,
        prediction_type, variance_type, clip_mode, clip_range, eta, use_clipped_model_output,
        guidance_scale, seed, noise_mode, False, prev, x0,
    )  # fmt: skip
    if copy_prev:
        prev_sample.copy_(prev.view(prev_sample.shape))
    if copy_x0:
        pred_original_sample.copy_(x0.view(pred_original_sample.shape))


@torch.library.custom_op(
    "dlcore::sampler_step", mutates_args=("prev_sample", "pred_original_sample")
)
def sampler_step_op(
    sample: Tensor,
    model_output: Tensor,
    uncond: Tensor | None,
    noise: Tensor | None,
    alpha_t: Tensor,
    alpha_prev: Tensor,
    noise_mask: Tensor | None,
    method: int,
    prediction_type: int,
    variance_type: int,
    clip_mode: int,
    clip_range: float,
    threshold_ratio: float,
    sample_max_value: float,
    eta: float,
    use_clipped_model_output: bool,
    guidance_scale: float,
    guidance_rescale: float,
    seed: int,
    noise_mode: int,
    prev_sample: Tensor,
    pred_original_sample: Tensor,
) -> None:
    """One fused step (see the module docstring). ``uncond`` set means guidance; learned variance
    types take 2C-channel model outputs. Outputs are written in place. The backend is chosen
    here, at run time, so compiled graphs honour ``dlcore.backend``."""
    backend = _select(_METHOD_NAMES[method], sample.device)
    _sampler_step(
        backend, sample, model_output, uncond, noise, alpha_t, alpha_prev, noise_mask, method,
        prediction_type, variance_type, clip_mode, clip_range, threshold_ratio,
        sample_max_value, eta, use_clipped_model_output, guidance_scale, guidance_rescale, seed,
        noise_mode, prev_sample, pred_original_sample,
    )  # fmt: skip


def _sampler_step(
    backend, sample, model_output, uncond, noise, alpha_t, alpha_prev, noise_mask, method,
    prediction_type, variance_type, clip_mode, clip_range, threshold_ratio, sample_max_value,
    eta, use_clipped_model_output, guidance_scale, guidance_rescale, seed, noise_mode,
    prev_sample, pred_original_sample,
):  # fmt: skip
    """The op's body for a chosen backend (eager calls skip the op wrapper: see ``_step``)."""
    method_name = _METHOD_NAMES[method]
    if backend == "eager":
        prev, x0 = _reference(
            method_name, sample, model_output, uncond, alpha_t, alpha_prev, eta=eta,
            noise_t=noise, noise_mode=noise_mode, seed=seed,
            add_noise=True if noise_mask is None else noise_mask > 0,
            variance_type=VARIANCE_TYPES[variance_type],
            prediction_type=PREDICTION_TYPES[prediction_type], clip_sample=clip_mode == 1,
            clip_sample_range=clip_range, thresholding=clip_mode == 2, ratio=threshold_ratio,
            sample_max_value=sample_max_value, use_clipped=use_clipped_model_output,
            guidance_scale=guidance_scale if uncond is not None else None,
            guidance_rescale=guidance_rescale,
        )  # fmt: skip
        prev_sample.copy_(prev)
        pred_original_sample.copy_(x0)
        return
    _run_kernels(
        backend, sample, model_output, uncond, noise, alpha_t, alpha_prev, noise_mask, method,
        prediction_type, variance_type, clip_mode, clip_range, threshold_ratio,
        sample_max_value, eta, use_clipped_model_output, guidance_scale, guidance_rescale, seed,
        noise_mode, prev_sample, pred_original_sample,
    )  # fmt: skip


@sampler_step_op.register_fake
def _(sample, model_output, uncond, noise, alpha_t, alpha_prev, noise_mask, method,
      prediction_type, variance_type, clip_mode, clip_range, threshold_ratio, sample_max_value,
      eta, use_clipped_model_output, guidance_scale, guidance_rescale, seed, noise_mode,
      prev_sample, pred_original_sample):  # fmt: skip
    return None


# Fake impls of the C++ kernel ops (schemas in csrc/dlcore.cpp), for opcheck and tracing.
if _ext.CPU_EXT_ERROR is None:

    @torch.library.register_fake("dlcore::sampler_step_kernel")
    def _(sample, model_output, uncond, noise, variance_pred, alpha_t, alpha_prev, cfg_factor,
          threshold, noise_mask, method, prediction_type, variance_type, clip_mode, clip_range,
          eta, use_clipped_model_output, guidance_scale, seed, noise_mode, abs_x0_only,
          prev_sample, pred_original_sample):  # fmt: skip
        return None

    @torch.library.register_fake("dlcore::sampler_cfg_stats_kernel")
    def _(cond, uncond, guidance_scale, partial):
        return None

    @torch.library.register_fake("dlcore::sampler_quantile_kernel")
    def _(scratch, ratio, min_value, max_value, out):
        return None


# ---------------------------------------------------------------- validation


def _check_choice(name: str, value, choices: Sequence[str]) -> int:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return choices.index(value)


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_alpha(name: str, alpha, sample: Tensor, allow_zero: bool = False) -> Tensor:
    """A float32 (batch,) tensor on the sample's device (a float or 0-d tensor broadcasts).
    ``allow_zero``: v-prediction steps from a zero-SNR timestep (alpha_prod_t = 0).
    """
    lo = "[0, 1]" if allow_zero else "(0, 1]"
    batch = sample.shape[0]
    if isinstance(alpha, torch.Tensor):
        if alpha.dim() > 1 or (alpha.dim() == 1 and alpha.shape[0] != batch):
            raise ValueError(
                f"{name} must be a float, a 0-d tensor or a per-sample tensor of shape "
                f"({batch},), got shape {_shape(alpha)}"
            )
        if not alpha.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got {alpha.dtype}")
        if alpha.device.type == "cpu" and not torch.compiler.is_compiling():
            # Only checked where it costs no device sync.
            values = alpha.reshape(-1).tolist()
            if not all((0.0 <= v if allow_zero else 0.0 < v) and v <= 1.0 for v in values):
                raise ValueError(f"{name} must lie in {lo}, got {alpha.tolist()}")
        alpha = alpha.to(device=sample.device, dtype=torch.float32)
        return alpha.expand(batch) if alpha.dim() == 0 else alpha
    if not isinstance(alpha, (int, float)):
        raise TypeError(f"{name} must be a float or a tensor, got {type(alpha).__name__}")
    alpha = float(alpha)
    if not (0.0 <= alpha if allow_zero else 0.0 < alpha) or alpha > 1.0:
        raise ValueError(f"{name} must lie in {lo}, got {alpha}")
    if torch.compiler.is_compiling():
        return torch.full((batch,), alpha, dtype=torch.float32, device=sample.device)
    return _filled_alpha(alpha, batch, sample.device)


@functools.lru_cache(maxsize=4096)
def _filled_alpha(value: float, batch: int, device: torch.device) -> Tensor:
    """(batch,) float32 of ``value``, read only by the kernels. Cached: a sampling loop reuses
    a few dozen alphas, and a fresh tensor per call costs a sizeable part of a small step."""
    return torch.full((batch,), value, dtype=torch.float32, device=device)


def _check_like(name: str, t: Tensor, sample: Tensor, shape: tuple[int, ...]) -> Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != sample.device:
        raise ValueError(f"{name} must be on {sample.device} like sample, got {t.device}")
    if t.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {_shape(t)}")
    if t.dtype != sample.dtype:
        raise ValueError(f"{name} must have the sample's dtype {sample.dtype}, got {t.dtype}")
    return t


def randn_like_diffusers(shape, generator, device, dtype) -> Tensor:
    """diffusers' ``randn_tensor``: draw on the generator's device (per-sample for a list of
    generators), then move; the same numbers diffusers' schedulers add."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(
                f"generator: a list of generators needs one per sample ({shape[0]}), "
                f"got {len(generator)}"
            )
        return torch.cat(
            [randn_like_diffusers((1, *shape[1:]), g, device, dtype) for g in generator]
        )
    gen_device = generator.device if generator is not None else torch.device(device)
    if gen_device.type == "cuda" and torch.device(device).type == "cpu":
        raise ValueError(
            f"generator: cannot draw CPU noise from a {gen_device} generator ({device} sample)"
        )
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


def _resolve_noise(noise, generator, seed, sample: Tensor, wanted: bool):
    """(noise tensor or None, noise_mode, seed) for the kernels."""
    if isinstance(noise, str):
        if noise != "fused":
            raise ValueError(f"noise must be a tensor, None or 'fused', got {noise!r}")
        if generator is not None:
            raise ValueError("pass either generator or noise='fused' (with seed), not both")
        if seed is None or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ValueError(f"noise='fused' needs an integer seed in [0, 2**63), got {seed!r}")
        return None, (2 if wanted else 0), seed
    if seed is not None:
        raise ValueError("seed is only used with noise='fused'")
    if noise is not None and generator is not None:
        raise ValueError(
            "pass either noise or generator, not both (as diffusers' variance_noise/generator)"
        )
    if not wanted:
        return None, 0, 0
    if noise is None:
        noise = randn_like_diffusers(sample.shape, generator, sample.device, sample.dtype)
    else:
        if not isinstance(noise, torch.Tensor):
            raise TypeError(f"noise must be a tensor, None or 'fused', got {type(noise).__name__}")
        if noise.device != sample.device:
            raise ValueError(f"noise must be on {sample.device} like sample, got {noise.device}")
        if _shape(noise) != _shape(sample):
            raise ValueError(f"noise must have shape {_shape(sample)}, got {_shape(noise)}")
        noise = noise.to(sample.dtype)
    return noise, 1, 0


def _needs_grad(*ts) -> bool:
    if not torch.is_grad_enabled():
        return False
    for t in ts:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            return True
    return False


def _step(
    method: str,
    sample: Tensor,
    model_output: Tensor,
    alpha_prod_t,
    alpha_prod_t_prev,
    *,
    eta: float,
    noise,
    generator,
    seed,
    add_noise,
    variance_type: str,
    prediction_type: str,
    clip_sample: bool,
    clip_sample_range: float,
    thresholding: bool,
    dynamic_thresholding_ratio: float,
    sample_max_value: float,
    use_clipped_model_output: bool,
    model_output_uncond,
    guidance_scale,
    guidance_rescale: float,
    out,
):
    if not isinstance(sample, torch.Tensor):
        raise TypeError(f"sample must be a torch.Tensor, got {type(sample).__name__}")
    if sample.dim() < 1 or sample.shape[0] == 0:
        raise ValueError(f"sample must be (batch, ...) with batch >= 1, got {_shape(sample)}")
    if sample.dtype not in (*FLOAT_DTYPES, torch.float64):
        raise ValueError(
            f"sample must have dtype float32, float16, bfloat16 or float64, got {sample.dtype}"
        )
    pred = _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    var = _check_choice("variance_type", variance_type, VARIANCE_TYPES)
    learned = variance_type in _LEARNED
    if learned and sample.dim() < 2:
        raise ValueError(
            f"variance_type={variance_type!r} needs sample (batch, channels, ...), "
            f"got {_shape(sample)}"
        )
    if thresholding and sample.dim() < 2:
        raise ValueError(f"thresholding needs sample (batch, channels, ...), got {_shape(sample)}")
    if thresholding and not 0.0 <= dynamic_thresholding_ratio <= 1.0:
        raise ValueError(
            f"dynamic_thresholding_ratio must lie in [0, 1], got {dynamic_thresholding_ratio}"
        )
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    batch = sample.shape[0]
    out_shape = _shape(sample)
    mo_shape = (out_shape[0], 2 * out_shape[1], *out_shape[2:]) if learned else out_shape
    guided = guidance_scale is not None
    if model_output_uncond is not None and not guided:
        raise ValueError("model_output_uncond needs guidance_scale")
    if guidance_rescale and not guided:
        raise ValueError("guidance_rescale needs guidance_scale")
    if not 0.0 <= guidance_rescale <= 1.0:
        raise ValueError(f"guidance_rescale must lie in [0, 1], got {guidance_rescale}")
    if guided and model_output_uncond is None:
        concat = (2 * mo_shape[0], *mo_shape[1:])
        if not isinstance(model_output, torch.Tensor) or model_output.shape != concat:
            got = _shape(model_output) if isinstance(model_output, torch.Tensor) else None
            raise ValueError(
                f"model_output must have shape {concat} (unconditional and conditional outputs "
                f"concatenated on the batch) when guidance_scale is given without "
                f"model_output_uncond, got {got}"
            )
        _check_like("model_output", model_output, sample, concat)
        model_output_uncond, model_output = model_output[:batch], model_output[batch:]
    else:
        if learned and isinstance(model_output, torch.Tensor) and model_output.dim() >= 2:
            if model_output.shape[1] != mo_shape[1]:
                raise ValueError(
                    f"model_output must have 2 * channels = {mo_shape[1]} channels for "
                    f"variance_type={variance_type!r} (epsilon then variance, as diffusers), "
                    f"got shape {_shape(model_output)}"
                )
        _check_like("model_output", model_output, sample, mo_shape)
        if model_output_uncond is not None:
            _check_like("model_output_uncond", model_output_uncond, sample, mo_shape)
    wants_noise = (method == "ddim" and eta > 0) or (
        method == "ddpm" and (isinstance(add_noise, torch.Tensor) or bool(add_noise))
    )
    noise_t, noise_mode, seed = _resolve_noise(noise, generator, seed, sample, wants_noise)
    noise_mask = None
    if isinstance(add_noise, torch.Tensor):
        if _shape(add_noise) not in ((), (batch,)):
            raise ValueError(
                f"add_noise must be a bool or of shape ({batch},), got {_shape(add_noise)}"
            )
        noise_mask = add_noise.to(device=sample.device, dtype=torch.float32).expand(batch)
    a_t = _check_alpha(
        "alpha_prod_t", alpha_prod_t, sample, allow_zero=prediction_type == "v_prediction"
    )
    a_prev_name = "alpha_prod_t_next" if method == "ddim_inversion" else "alpha_prod_t_prev"
    a_prev = _check_alpha(a_prev_name, alpha_prod_t_prev, sample)
    if out is not None:
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise ValueError("out must be a (prev_sample, pred_original_sample) pair of tensors")
        for name, t in zip(("out[0]", "out[1]"), out, strict=True):
            _check_like(name, t, sample, out_shape)
        if out[0].data_ptr() == out[1].data_ptr():
            raise ValueError("out[0] and out[1] must be different tensors")

    # float64 and autograd run the differentiable reference; so does a forced eager backend,
    # here with the caller's own alphas (bit for bit diffusers). Under torch.compile the op
    # picks the backend at run time instead.
    compiling = torch.compiler.is_compiling()
    if sample.dtype == torch.float64 or _needs_grad(
        sample, model_output, model_output_uncond, noise_t, alpha_prod_t, alpha_prod_t_prev
    ):
        eager = True
    elif compiling:
        eager = False
    else:
        backend = _select(method, sample.device)
        eager = backend == "eager"
    if eager:
        if out is not None and _needs_grad(sample, model_output, model_output_uncond):
            raise ValueError("out= is not supported when inputs require grad")
        result = _reference(
            method, sample, model_output, model_output_uncond, alpha_prod_t, alpha_prod_t_prev,
            eta=eta, noise_t=noise_t, noise_mode=noise_mode, seed=seed, add_noise=add_noise,
            variance_type=variance_type, prediction_type=prediction_type,
            clip_sample=clip_sample, clip_sample_range=clip_sample_range,
            thresholding=thresholding, ratio=dynamic_thresholding_ratio,
            sample_max_value=sample_max_value, use_clipped=use_clipped_model_output,
            guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
        )  # fmt: skip
        if out is None:
            return result
        out[0].copy_(result[0])
        out[1].copy_(result[1])
        return out[0], out[1]
    if out is None:
        prev = torch.empty_like(sample, memory_format=torch.contiguous_format)
        x0 = torch.empty_like(sample, memory_format=torch.contiguous_format)
    else:
        prev, x0 = out
        inputs = [
            (iname, t, _span(t))
            for iname, t in (
                ("sample", sample),
                ("model_output", model_output),
                ("model_output_uncond", model_output_uncond),
                ("noise", noise_t),
            )
            if t is not None
        ]
        for name, o in (("out[0]", prev), ("out[1]", x0)):
            o_span = _span(o)
            for iname, t, t_span in inputs:
                if not _spans_meet(o_span, t_span):
                    continue
                if o.data_ptr() != t.data_ptr() or o.stride() != t.stride() or o.shape != t.shape:
                    raise ValueError(
                        f"{name} overlaps {iname} without being exactly the same tensor; an "
                        "output may only alias an input element for element"
                    )
    clip_mode = 2 if thresholding else (1 if clip_sample else 0)
    # Outside torch.compile the op wrapper's per-call bookkeeping (hundreds of microseconds) is
    # skipped; the body is the same function.
    args = (
        sample, model_output, model_output_uncond, noise_t, a_t, a_prev, noise_mask,
        _METHODS[method], pred, var, clip_mode, float(clip_sample_range),
        float(dynamic_thresholding_ratio), float(sample_max_value), float(eta),
        bool(use_clipped_model_output and method == "ddim"),
        float(guidance_scale) if guided else 1.0, float(guidance_rescale), int(seed),
        noise_mode, prev, x0,
    )  # fmt: skip
    if compiling:
        sampler_step_op(*args)
    else:
        _sampler_step(backend, *args)
    return prev, x0


def _reference(
    method, sample, model_output, uncond, alpha_t, alpha_prev, *, eta, noise_t, noise_mode, seed,
    add_noise, variance_type, prediction_type, clip_sample, clip_sample_range, thresholding,
    ratio, sample_max_value, use_clipped, guidance_scale, guidance_rescale,
):  # fmt: skip
    if noise_mode == 2:
        noise_t = ref.philox_randn(seed, _shape(sample), sample.device).to(sample.dtype)
    common = dict(
        prediction_type=prediction_type,
        clip_sample=clip_sample,
        clip_sample_range=clip_sample_range,
        thresholding=thresholding,
        dynamic_thresholding_ratio=ratio,
        sample_max_value=sample_max_value,
        model_output_uncond=uncond,
        guidance_scale=guidance_scale,
        guidance_rescale=guidance_rescale,
    )
    if method == "ddim":
        return ref.ddim_step(
            sample, model_output, alpha_t, alpha_prev, eta=eta, noise=noise_t,
            use_clipped_model_output=use_clipped, **common,
        )  # fmt: skip
    if method == "ddpm":
        return ref.ddpm_step(
            sample, model_output, alpha_t, alpha_prev, noise=noise_t, add_noise=add_noise,
            variance_type=variance_type, **common,
        )  # fmt: skip
    return ref.ddim_inversion_step(sample, model_output, alpha_t, alpha_prev, **common)


# ---------------------------------------------------------------- public functions


def ddim_step(
    sample: Tensor,
    model_output: Tensor,
    alpha_prod_t: float | Tensor,
    alpha_prod_t_prev: float | Tensor,
    *,
    eta: float = 0.0,
    noise: Tensor | str | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    seed: int | None = None,
    prediction_type: str = "epsilon",
    clip_sample: bool = False,
    clip_sample_range: float = 1.0,
    thresholding: bool = False,
    dynamic_thresholding_ratio: float = 0.995,
    sample_max_value: float = 1.0,
    use_clipped_model_output: bool = False,
    model_output_uncond: Tensor | None = None,
    guidance_scale: float | None = None,
    guidance_rescale: float = 0.0,
    out: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """One DDIM step, fused: returns ``(prev_sample, pred_original_sample)``.

    The math is diffusers' ``DDIMScheduler.step`` given ``alpha_prod_t`` (alphas_cumprod at t)
    and ``alpha_prod_t_prev`` (at the previous timestep, or ``final_alpha_cumprod``); each may
    be a float, a 0-d tensor or a per-sample ``(batch,)`` tensor. ``sample`` is (batch, ...) in
    float32/float16/bfloat16 (float32 arithmetic inside; float64 runs the eager reference).

    Guidance: with ``guidance_scale`` the model output is guided as
    ``uncond + guidance_scale * (cond - uncond)`` inside the kernel, ``model_output`` being the
    conditional output and ``model_output_uncond`` the unconditional one, or, without
    ``model_output_uncond``, ``model_output`` holding both concatenated on the batch
    (unconditional first, as diffusers' ``noise_pred.chunk(2)``); ``guidance_rescale`` > 0
    applies diffusers' ``rescale_noise_cfg``.

    Noise (used when ``eta > 0``): a tensor (diffusers' ``variance_noise``; with the eager
    backend the result is bit-for-bit diffusers'), a torch ``generator`` (drawn exactly like
    diffusers' ``randn_tensor``), ``noise="fused"`` with ``seed``: Gaussian noise generated
    inside the kernel, element ``i`` of the row-major sample being ``tl.randn(seed, i)``
    (Philox4x32-10, see ``dlcore.reference.sampler.philox_randn``), or None: the global RNG.

    ``out=(prev_sample, pred_original_sample)`` writes in place (``out[0]`` may be ``sample``
    itself); nothing else full-size is allocated, except with ``thresholding``: a quantile
    scratch where ``pred_original_sample`` aliases an input, and the temporaries of
    ``torch.kthvalue`` on the GPU backends (the CPU kernel selects in per-thread rows).
    Inputs whose samples are not contiguous are copied once; ``out`` tensors that are not are
    written through a temporary.

    Alpha values are checked to lie in (0, 1] when they are floats or CPU tensors (a CUDA tensor
    is not read back, to keep the step free of host synchronisation).

    Autograd: the fused kernels have none; when an input requires grad, the call runs the
    differentiable eager reference instead (``out=`` is then refused).
    """
    return _step(
        "ddim", sample, model_output, alpha_prod_t, alpha_prod_t_prev, eta=eta, noise=noise,
        generator=generator, seed=seed, add_noise=True, variance_type="fixed_small",
        prediction_type=prediction_type, clip_sample=clip_sample,
        clip_sample_range=clip_sample_range, thresholding=thresholding,
        dynamic_thresholding_ratio=dynamic_thresholding_ratio, sample_max_value=sample_max_value,
        use_clipped_model_output=use_clipped_model_output,
        model_output_uncond=model_output_uncond, guidance_scale=guidance_scale,
        guidance_rescale=guidance_rescale, out=out,
    )  # fmt: skip


def ddpm_step(
    sample: Tensor,
    model_output: Tensor,
    alpha_prod_t: float | Tensor,
    alpha_prod_t_prev: float | Tensor,
    *,
    variance_type: str = "fixed_small",
    noise: Tensor | str | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    seed: int | None = None,
    add_noise: bool | Tensor = True,
    prediction_type: str = "epsilon",
    clip_sample: bool = False,
    clip_sample_range: float = 1.0,
    thresholding: bool = False,
    dynamic_thresholding_ratio: float = 0.995,
    sample_max_value: float = 1.0,
    model_output_uncond: Tensor | None = None,
    guidance_scale: float | None = None,
    guidance_rescale: float = 0.0,
    out: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """One DDPM step, fused: returns ``(prev_sample, pred_original_sample)``.

    diffusers' ``DDPMScheduler.step`` given the alphas (``alpha_prod_t_prev`` = 1 at the last
    step). ``variance_type`` is one of fixed_small, fixed_small_log, fixed_large,
    fixed_large_log, learned, learned_range; the learned types take a model output with 2C
    channels (epsilon, then the predicted variance) exactly as diffusers. With guidance, only
    the epsilon channels are guided and the variance comes from the conditional output.
    ``add_noise`` (bool or per-sample bool tensor) is diffusers' ``t > 0``: False adds no noise
    (and draws none). fixed_large_log uses std = exp(0.5 * log(beta_t)), where diffusers
    returns NaN. Everything else as :func:`ddim_step`.
    """
    return _step(
        "ddpm", sample, model_output, alpha_prod_t, alpha_prod_t_prev, eta=0.0, noise=noise,
        generator=generator, seed=seed, add_noise=add_noise, variance_type=variance_type,
        prediction_type=prediction_type, clip_sample=clip_sample,
        clip_sample_range=clip_sample_range, thresholding=thresholding,
        dynamic_thresholding_ratio=dynamic_thresholding_ratio, sample_max_value=sample_max_value,
        use_clipped_model_output=False, model_output_uncond=model_output_uncond,
        guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, out=out,
    )  # fmt: skip


def ddim_inversion_step(
    sample: Tensor,
    model_output: Tensor,
    alpha_prod_t: float | Tensor,
    alpha_prod_t_next: float | Tensor,
    *,
    prediction_type: str = "epsilon",
    clip_sample: bool = False,
    clip_sample_range: float = 1.0,
    thresholding: bool = False,
    dynamic_thresholding_ratio: float = 0.995,
    sample_max_value: float = 1.0,
    model_output_uncond: Tensor | None = None,
    guidance_scale: float | None = None,
    guidance_rescale: float = 0.0,
    out: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Deterministic DDIM inversion, fused: x_{t+1} from x_t, as diffusers'
    ``DDIMInverseScheduler.step`` (``alpha_prod_t_next`` is the noisier timestep's alpha).
    Returns ``(next_sample, pred_original_sample)``; arguments as :func:`ddim_step`."""
    return _step(
        "ddim_inversion", sample, model_output, alpha_prod_t, alpha_prod_t_next, eta=0.0,
        noise=None, generator=None, seed=None, add_noise=False, variance_type="fixed_small",
        prediction_type=prediction_type, clip_sample=clip_sample,
        clip_sample_range=clip_sample_range, thresholding=thresholding,
        dynamic_thresholding_ratio=dynamic_thresholding_ratio, sample_max_value=sample_max_value,
        use_clipped_model_output=False, model_output_uncond=model_output_uncond,
        guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, out=out,
    )  # fmt: skip


# ---------------------------------------------------------------- python -m dlcore check


def _case(shape, per_sample=False, guided=False, learned=False):
    def make(dtype, device, gen):
        b = shape[0]
        mo_shape = (b, 2 * shape[1], *shape[2:]) if learned else shape
        x = torch.randn(shape, generator=gen).to(device, dtype)
        m = torch.randn(mo_shape, generator=gen).to(device, dtype)
        kw = {}
        if guided:
            kw = dict(
                model_output_uncond=torch.randn(mo_shape, generator=gen).to(device, dtype),
                guidance_scale=5.0,
                guidance_rescale=0.7,
            )
        if learned:
            # the variance channels of a learned_range model lie in [-1, 1]
            m[:, shape[1] :] = torch.rand(shape, generator=gen).to(device, dtype) * 2 - 1
            if guided:
                kw["model_output_uncond"][:, shape[1] :] = m[:, shape[1] :]
        if per_sample:
            a_t = torch.rand(b, generator=gen).to(device) * 0.8 + 0.1
            a_prev = (a_t + 0.05).clamp(max=0.999)
        else:
            a_t, a_prev = 0.3, 0.55
        kw["noise"] = torch.randn(shape, generator=gen).to(device, dtype)
        return (x, m, a_t, a_prev), kw

    return make


def parity_cases() -> list[Case]:
    names = implemented()
    shape = (2, 3, 5, 7)
    return [
        Case(
            "ddim_step",
            "eta=0.5, per-sample alphas, CFG + rescale, thresholding",
            _case(shape, per_sample=True, guided=True),
            functools.partial(ddim_step, eta=0.5, thresholding=True, sample_max_value=1.5),
            functools.partial(ref.ddim_step, eta=0.5, thresholding=True, sample_max_value=1.5),
            names,
            outputs=("prev_sample", "pred_original_sample"),
        ),
        Case(
            "ddim_step",
            "v_prediction, clip, use_clipped_model_output",
            _case(shape),
            functools.partial(
                ddim_step,
                prediction_type="v_prediction",
                clip_sample=True,
                use_clipped_model_output=True,
                eta=1.0,
            ),  # fmt: skip
            functools.partial(
                ref.ddim_step,
                prediction_type="v_prediction",
                clip_sample=True,
                use_clipped_model_output=True,
                eta=1.0,
            ),  # fmt: skip
            names,
            outputs=("prev_sample", "pred_original_sample"),
        ),
        Case(
            "ddpm_step",
            "learned_range, CFG, sample prediction, clip",
            _case(shape, guided=True, learned=True),
            functools.partial(
                ddpm_step,
                variance_type="learned_range",
                prediction_type="sample",
                clip_sample=True,
            ),  # fmt: skip
            functools.partial(
                ref.ddpm_step,
                variance_type="learned_range",
                prediction_type="sample",
                clip_sample=True,
            ),  # fmt: skip
            names,
            outputs=("prev_sample", "pred_original_sample"),
        ),
        Case(
            "ddpm_step",
            "fixed_small, per-sample alphas",
            _case(shape, per_sample=True),
            ddpm_step,
            ref.ddpm_step,
            names,
            outputs=("prev_sample", "pred_original_sample"),
        ),
        Case(
            "ddim_inversion_step",
            "epsilon",
            _case(shape),
            lambda x, m, a, b, noise: ddim_inversion_step(x, m, a, b),
            lambda x, m, a, b, noise: ref.ddim_inversion_step(x, m, a, b),
            names,
            outputs=("next_sample", "pred_original_sample"),
        ),
    ]
