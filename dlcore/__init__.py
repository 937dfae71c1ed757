"""dlcore: fused attention, diffusion sampler step, Mamba selective scan and LoRA kernels."""

from . import _ext  # noqa: F401  (loads the C++/CUDA kernel libraries when built)
from .backends import BACKENDS, backend, backends
from .ops.attention import (
    flash_attn_func,
    flash_attn_varlen_func,
    flash_attn_with_kvcache,
    scaled_dot_product_attention,
)
from .ops.lora import lora_linear, lora_linear_multi
from .ops.sampler import ddim_inversion_step, ddim_step, ddpm_step
from .ops.scan import selective_scan, selective_state_update
from .patch import PatchReport, patch, unpatch
from .schedulers import DDIMScheduler, DDPMScheduler

__version__ = "0.1.0"

__all__ = ["BACKENDS", "backend", "backends"]
__all__ += ["selective_scan", "selective_state_update"]
__all__ += ["PatchReport", "patch", "unpatch"]
__all__ += [
    "flash_attn_func",
    "flash_attn_varlen_func",
    "flash_attn_with_kvcache",
    "scaled_dot_product_attention",
]
__all__ += ["lora_linear", "lora_linear_multi"]
__all__ += ["ddim_inversion_step", "ddim_step", "ddpm_step", "DDIMScheduler", "DDPMScheduler"]
