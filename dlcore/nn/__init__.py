"""dlcore.nn: drop-in modules built on dlcore's fused ops."""

from .lora import LoRALinear

__all__ = ["LoRALinear"]
