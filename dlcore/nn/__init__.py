"""dlcore.nn: drop-in modules built on dlcore's fused ops."""

from .lora import LoRALinear
from .scan import MambaMixer

__all__ = ["LoRALinear"]
__all__ += ["MambaMixer"]
