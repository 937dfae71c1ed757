"""Drop-in replacements for diffusers' ``DDIMScheduler`` and ``DDPMScheduler`` whose ``step``
runs dlcore's fused kernels.

Same constructor arguments and defaults, ``from_config`` (a dict, a diffusers config, or a
diffusers scheduler), ``set_timesteps``, ``step`` (same arguments and return types, plus
classifier-free guidance arguments), ``add_noise``, ``get_velocity``, ``scale_model_input``,
``timesteps``, ``init_noise_sigma``, ``order``. So one line swaps them into a pipeline::

    pipe.scheduler = dlcore.schedulers.DDIMScheduler.from_config(pipe.scheduler.config)

No host synchronisation in ``step``: the schedule tables are kept on the sample's device and
timestep -> alpha lookups are gathers (a CUDA timestep tensor is never read back; DDPM then draws
the last step's noise and masks it on the device instead of skipping the draw, which changes
nothing in the image). With ``dlcore.backend("eager")`` a step is bit for bit diffusers'; the
fused backends agree to float32 rounding.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..ops.sampler import ddim_step, ddpm_step

Tensor = torch.Tensor


class SchedulerConfig(dict):
    """Read-only dict whose keys are also attributes, like diffusers' ``FrozenDict``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"scheduler config has no {name!r}") from None

    def __setitem__(self, key, value):
        raise TypeError("the scheduler config is frozen; build a new scheduler with from_config")


@dataclass
class SchedulerOutput:
    """``step``'s result: ``prev_sample`` and ``pred_original_sample``, also indexable like
    diffusers' ``BaseOutput`` (``out[0]``, ``out["prev_sample"]``, ``to_tuple()``)."""

    prev_sample: Tensor
    pred_original_sample: Tensor | None = None

    def to_tuple(self) -> tuple:
        return tuple(v for v in (self.prev_sample, self.pred_original_sample) if v is not None)

    def __getitem__(self, key):
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]

    def keys(self):
        return [k for k in ("prev_sample", "pred_original_sample") if getattr(self, k) is not None]


def betas_for_alpha_bar(num_diffusion_timesteps: int, max_beta: float = 0.999, kind="cosine"):
    if kind == "cosine":

        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    else:  # laplace

        def alpha_bar(t):
            lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
            snr = math.exp(lmb)
            return math.sqrt(snr / (1 + snr))

    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return torch.tensor(betas, dtype=torch.float32)


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Zero terminal SNR (arXiv 2305.08891, Algorithm 1), as diffusers computes it."""
    alphas = 1.0 - betas
    alphas_cumprod = torch.cumprod(alphas, dim=0)
    alphas_bar_sqrt = alphas_cumprod.sqrt()
    alphas_bar_sqrt_0 = alphas_bar_sqrt[0].clone()
    alphas_bar_sqrt_T = alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt -= alphas_bar_sqrt_T
    alphas_bar_sqrt *= alphas_bar_sqrt_0 / (alphas_bar_sqrt_0 - alphas_bar_sqrt_T)
    alphas_bar = alphas_bar_sqrt**2
    alphas = alphas_bar[1:] / alphas_bar[:-1]
    alphas = torch.cat([alphas_bar[0:1], alphas])
    return 1 - alphas


def _make_betas(config, schedules: tuple[str, ...], cls_name: str) -> Tensor:
    n = config["num_train_timesteps"]
    start, end = config["beta_start"], config["beta_end"]
    schedule = config["beta_schedule"]
    if config["trained_betas"] is not None:
        betas = torch.tensor(config["trained_betas"], dtype=torch.float32)
    elif schedule not in schedules:
        raise NotImplementedError(
            f"beta_schedule {schedule!r} is not implemented for {cls_name} "
            f"(supported: {', '.join(schedules)})"
        )
    elif schedule == "linear":
        betas = torch.linspace(start, end, n, dtype=torch.float32)
    elif schedule == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, n, dtype=torch.float32) ** 2
    elif schedule == "squaredcos_cap_v2":
        betas = betas_for_alpha_bar(n)
    elif schedule == "laplace":
        betas = betas_for_alpha_bar(n, kind="laplace")
    else:  # sigmoid
        betas = torch.sigmoid(torch.linspace(-6, 6, n)) * (end - start) + start
    if config["rescale_betas_zero_snr"]:
        betas = rescale_zero_terminal_snr(betas)
    return betas


def _spaced_timesteps(config, num_inference_steps: int) -> np.ndarray:
    n = config["num_train_timesteps"]
    if num_inference_steps > n:
        raise ValueError(
            f"num_inference_steps ({num_inference_steps}) cannot be larger than "
            f"num_train_timesteps ({n})"
        )
    spacing = config["timestep_spacing"]
    if spacing == "linspace":
        return np.linspace(0, n - 1, num_inference_steps).round()[::-1].copy().astype(np.int64)
    if spacing == "leading":
        step_ratio = n // num_inference_steps
        ts = (np.arange(0, num_inference_steps) * step_ratio).round()[::-1].copy().astype(np.int64)
        return ts + config["steps_offset"]
    if spacing == "trailing":
        step_ratio = n / num_inference_steps
        return np.round(np.arange(n, 0, -step_ratio)).astype(np.int64) - 1
    raise ValueError(
        f"timestep_spacing must be one of 'linspace', 'leading', 'trailing', got {spacing!r}"
    )


def _host_scalar(t) -> int | None:
    """The timestep as an int when reading it costs no device sync (int or CPU 0-d tensor)."""
    if not isinstance(t, torch.Tensor):
        return int(t)
    if t.device.type == "cpu" and t.dim() == 0:
        return int(t)
    return None


class _SchedulerBase:
    order = 1
    init_noise_sigma = 1.0
    _schedules: tuple[str, ...] = ()

    def __init__(self, config: dict[str, Any]):
        self.config = SchedulerConfig(config)
        self.betas = _make_betas(self.config, self._schedules, type(self).__name__)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self._alphas_list = self.alphas_cumprod.tolist()
        self.num_inference_steps: int | None = None
        n = self.config["num_train_timesteps"]
        self.timesteps = torch.from_numpy(np.arange(0, n)[::-1].copy().astype(np.int64))
        self._tables: dict[torch.device, dict[str, Tensor]] = {}

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs: bool = False, **kwargs):
        """Build from a dict, a diffusers config (``scheduler.config``) or a diffusers scheduler;
        keys this scheduler does not take (``_class_name``, another scheduler's options) are
        ignored as diffusers does; ``kwargs`` override."""
        if config is not None and not isinstance(config, Mapping) and hasattr(config, "config"):
            config = config.config
        merged = dict(config or {})
        merged.update(kwargs)
        params = inspect.signature(cls.__init__).parameters
        used = {k: v for k, v in merged.items() if k in params and k != "self"}
        unused = {k: v for k, v in merged.items() if k not in used and not k.startswith("_")}
        scheduler = cls(**used)
        return (scheduler, unused) if return_unused_kwargs else scheduler

    def __len__(self) -> int:
        return self.config["num_train_timesteps"]

    def scale_model_input(self, sample: Tensor, timestep: int | None = None) -> Tensor:
        return sample

    def _table(self, device: torch.device) -> dict[str, Tensor]:
        """Schedule tables on ``device``, copied once per device (and per set_timesteps)."""
        if device not in self._tables:
            self._tables[device] = {k: v.to(device) for k, v in self._host_tables().items()}
        return self._tables[device]

    def _host_tables(self) -> dict[str, Tensor]:
        return {"alphas_cumprod": self.alphas_cumprod}

    def _alpha_t(self, timestep, t: int | None, device) -> Tensor | float:
        """alphas_cumprod[timestep]: a Python float for a host timestep ``t`` (the float32 value
        exactly), else a gather on the device."""
        if t is not None:
            return self._alphas_list[t]
        return self._table(device)["alphas_cumprod"][timestep.to(device)]

    def _scaled(self, samples: Tensor, timesteps: Tensor):
        self.alphas_cumprod = self.alphas_cumprod.to(device=samples.device)
        alphas_cumprod = self.alphas_cumprod.to(dtype=samples.dtype)
        timesteps = timesteps.to(samples.device)
        sqrt_alpha_prod = alphas_cumprod[timesteps] ** 0.5
        sqrt_alpha_prod = sqrt_alpha_prod.flatten()
        while len(sqrt_alpha_prod.shape) < len(samples.shape):
            sqrt_alpha_prod = sqrt_alpha_prod.unsqueeze(-1)
        sqrt_one_minus_alpha_prod = (1 - alphas_cumprod[timesteps]) ** 0.5
        sqrt_one_minus_alpha_prod = sqrt_one_minus_alpha_prod.flatten()
        while len(sqrt_one_minus_alpha_prod.shape) < len(samples.shape):
            sqrt_one_minus_alpha_prod = sqrt_one_minus_alpha_prod.unsqueeze(-1)
        return sqrt_alpha_prod, sqrt_one_minus_alpha_prod

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """Forward diffusion q(x_t | x_0), as diffusers (per-sample timesteps)."""
        a, b = self._scaled(original_samples, timesteps)
        return a * original_samples + b * noise

    def get_velocity(self, sample: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """v = sqrt(alpha_bar) * noise - sqrt(1 - alpha_bar) * sample, as diffusers."""
        a, b = self._scaled(sample, timesteps)
        return a * noise - b * sample

    def _require_steps(self):
        if self.num_inference_steps is None:
            raise ValueError(
                "num_inference_steps is None: call set_timesteps before step, as with diffusers"
            )


class DDIMScheduler(_SchedulerBase):
    """diffusers' DDIMScheduler with a fused ``step`` (see the module docstring)."""

    _schedules = ("linear", "scaled_linear", "squaredcos_cap_v2")

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
    ):
        super().__init__({k: v for k, v in locals().items() if k not in ("self", "__class__")})
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]

    def _host_tables(self):
        return {"alphas_cumprod": self.alphas_cumprod, "final": self.final_alpha_cumprod}

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None):
        ts = _spaced_timesteps(self.config, num_inference_steps)
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.from_numpy(ts).to(device)

    def _alpha_prev(self, timestep, t: int | None, device) -> Tensor | float:
        offset = self.config["num_train_timesteps"] // self.num_inference_steps
        if t is not None:
            return (
                self._alphas_list[t - offset]
                if t - offset >= 0
                else float(self.final_alpha_cumprod)
            )
        table = self._table(device)
        prev = timestep.to(device) - offset
        return torch.where(prev >= 0, table["alphas_cumprod"][prev.clamp(min=0)], table["final"])

    def step(
        self,
        model_output: Tensor,
        timestep: int | Tensor,
        sample: Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | None = None,
        variance_noise: Tensor | str | None = None,
        return_dict: bool = True,
        *,
        seed: int | None = None,
        model_output_uncond: Tensor | None = None,
        guidance_scale: float | None = None,
        guidance_rescale: float = 0.0,
        out: tuple[Tensor, Tensor] | None = None,
    ) -> SchedulerOutput | tuple:
        """diffusers' ``DDIMScheduler.step`` in one fused kernel. ``timestep`` may be an int, a
        0-d tensor or a per-sample (batch,) tensor. Extras: ``variance_noise="fused"`` with
        ``seed`` (in-kernel noise), guidance (``model_output_uncond`` / batch-concatenated
        ``model_output``, ``guidance_scale``, ``guidance_rescale``) and ``out``, as
        :func:`dlcore.ddim_step`."""
        self._require_steps()
        device = sample.device
        host_t = _host_scalar(timestep)
        prev_sample, pred_original_sample = ddim_step(
            sample, model_output, self._alpha_t(timestep, host_t, device),
            self._alpha_prev(timestep, host_t, device), eta=eta, noise=variance_noise,
            generator=generator, seed=seed, prediction_type=self.config["prediction_type"],
            clip_sample=self.config["clip_sample"],
            clip_sample_range=self.config["clip_sample_range"],
            thresholding=self.config["thresholding"],
            dynamic_thresholding_ratio=self.config["dynamic_thresholding_ratio"],
            sample_max_value=self.config["sample_max_value"],
            use_clipped_model_output=use_clipped_model_output,
            model_output_uncond=model_output_uncond, guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale, out=out,
        )  # fmt: skip
        if not return_dict:
            return prev_sample, pred_original_sample
        return SchedulerOutput(prev_sample, pred_original_sample)


class DDPMScheduler(_SchedulerBase):
    """diffusers' DDPMScheduler with a fused ``step`` (see the module docstring). Its
    ``fixed_large_log`` noise is exp(0.5 * log(beta_t)) where diffusers returns NaN."""

    _schedules = ("linear", "scaled_linear", "squaredcos_cap_v2", "laplace", "sigmoid")

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        super().__init__({k: v for k, v in locals().items() if k not in ("self", "__class__")})
        self.one = torch.tensor(1.0)
        self.custom_timesteps = False
        self.variance_type = variance_type
        self._prev = torch.arange(-1, num_train_timesteps - 1, dtype=torch.int64)
        self._prev_list = self._prev.tolist()

    def _host_tables(self):
        return {"alphas_cumprod": self.alphas_cumprod, "one": self.one, "prev": self._prev}

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | None = None,
    ):
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("pass only one of num_inference_steps and timesteps")
        n = self.config["num_train_timesteps"]
        if timesteps is not None:
            for i in range(1, len(timesteps)):
                if timesteps[i] >= timesteps[i - 1]:
                    raise ValueError("timesteps must be in descending order")
            if timesteps[0] >= n:
                raise ValueError(f"timesteps must start below num_train_timesteps ({n})")
            ts = np.array(timesteps, dtype=np.int64)
            self.custom_timesteps = True
        else:
            ts = _spaced_timesteps(self.config, num_inference_steps)
            self.num_inference_steps = num_inference_steps
            self.custom_timesteps = False
        self.timesteps = torch.from_numpy(ts).to(device)
        # previous_timestep as a table, so step looks it up on the device.
        prev = torch.arange(-1, n - 1, dtype=torch.int64)
        prev[torch.from_numpy(ts)] = torch.from_numpy(np.append(ts[1:], -1))
        self._prev = prev
        self._prev_list = prev.tolist()
        self._tables.clear()

    def previous_timestep(self, timestep):
        table = self._table(
            timestep.device if isinstance(timestep, Tensor) else torch.device("cpu")
        )
        return table["prev"][timestep]

    def step(
        self,
        model_output: Tensor,
        timestep: int | Tensor,
        sample: Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
        *,
        variance_noise: Tensor | str | None = None,
        seed: int | None = None,
        model_output_uncond: Tensor | None = None,
        guidance_scale: float | None = None,
        guidance_rescale: float = 0.0,
        out: tuple[Tensor, Tensor] | None = None,
    ) -> SchedulerOutput | tuple:
        """diffusers' ``DDPMScheduler.step`` in one fused kernel; learned variance types take
        the 2C-channel model output. Extras as :meth:`DDIMScheduler.step`."""
        device = sample.device
        host_t = _host_scalar(timestep)
        if host_t is not None:
            prev_t = self._prev_list[host_t]
            alpha_t = self._alphas_list[host_t]
            alpha_prev = self._alphas_list[prev_t] if prev_t >= 0 else 1.0
            add_noise = host_t > 0  # diffusers draws noise only when t > 0
        else:
            table = self._table(device)
            t = timestep.to(device)
            prev_t = table["prev"][t]
            alpha_t = table["alphas_cumprod"][t]
            alpha_prev = torch.where(
                prev_t >= 0, table["alphas_cumprod"][prev_t.clamp(min=0)], table["one"]
            )
            add_noise = t > 0  # per sample, on the device: no sync
        prev_sample, pred_original_sample = ddpm_step(
            sample, model_output, alpha_t, alpha_prev, variance_type=self.variance_type,
            noise=variance_noise, generator=generator, seed=seed, add_noise=add_noise,
            prediction_type=self.config["prediction_type"],
            clip_sample=self.config["clip_sample"],
            clip_sample_range=self.config["clip_sample_range"],
            thresholding=self.config["thresholding"],
            dynamic_thresholding_ratio=self.config["dynamic_thresholding_ratio"],
            sample_max_value=self.config["sample_max_value"],
            model_output_uncond=model_output_uncond, guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale, out=out,
        )  # fmt: skip
        if not return_dict:
            return prev_sample, pred_original_sample
        return SchedulerOutput(prev_sample, pred_original_sample)
