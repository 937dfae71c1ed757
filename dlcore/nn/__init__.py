"""dlcore.nn: drop-in modules built on dlcore's fused ops."""

from .attention import AttnProcessor, MultiheadAttention, transformers_attention_forward
from .lora import LoRALinear
from .scan import MambaMixer

__all__ = ["LoRALinear"]
__all__ += ["MambaMixer"]
__all__ += ["AttnProcessor", "MultiheadAttention", "transformers_attention_forward"]
