"""Diffusion schedulers whose step is one fused dlcore kernel, drop-in for diffusers'."""

from .schedulers import DDIMScheduler, DDPMScheduler, SchedulerConfig, SchedulerOutput

__all__ = ["DDIMScheduler", "DDPMScheduler", "SchedulerConfig", "SchedulerOutput"]
