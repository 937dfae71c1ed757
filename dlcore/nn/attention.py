"""Attention drop-ins built on dlcore's fused attention.

- :class:`MultiheadAttention`: ``torch.nn.MultiheadAttention`` with the same constructor,
  parameters (so the same ``state_dict`` keys and initialisation), forward signature and
  results; the attention itself runs in ``dlcore.scaled_dot_product_attention`` and the
  (L, S) weight matrix is only materialised when ``need_weights=True``.
- :func:`transformers_attention_forward`, registered with transformers' ``AttentionInterface``
  (and the matching mask format with ``AttentionMaskInterface``) under the name ``"dlcore"`` when
  transformers is installed, so ``from_pretrained(..., attn_implementation="dlcore")`` and
  ``model.set_attn_implementation("dlcore")`` work.
- :class:`AttnProcessor`: a diffusers attention processor (the ``AttnProcessor2_0`` computation)
  for ``diffusers.models.attention_processor.Attention``.
"""

from __future__ import annotations

import copy
import importlib.util
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.attention import flash_attn_func, scaled_dot_product_attention

__all__ = ["AttnProcessor", "MultiheadAttention", "transformers_attention_forward"]


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """torch.nn.MultiheadAttention's mask convention (bool True = do NOT attend, float = added to
    the scores) as an additive float mask."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
            mask, float("-inf")
        )
    if not mask.is_floating_point():
        raise ValueError(f"attention masks must be bool or floating point, got {mask.dtype}")
    return mask.to(dtype)


class MultiheadAttention(nn.MultiheadAttention):
    """Drop-in for :class:`torch.nn.MultiheadAttention` (same constructor arguments, parameters,
    ``state_dict`` keys and initialisation) whose attention runs in dlcore's fused kernels.

    Differences from torch: a query row whose keys are all masked gives 0 (torch gives NaN), and
    the returned weights are the softmax probabilities before dropout (torch returns them after
    its own dropout draw, which no other implementation can reproduce).
    """

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention) -> MultiheadAttention:
        """A dlcore module sharing ``mha``'s parameters (training one trains the other)."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(
                f"from_torch expects a torch.nn.MultiheadAttention, got {type(mha).__name__}"
            )
        new = cls.__new__(cls)
        # Own containers (parameters, submodules, hooks) holding the same objects.
        new.__dict__.update(
            {k: copy.copy(v) if isinstance(v, dict) else v for k, v in mha.__dict__.items()}
        )
        return new

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batched = query.dim() == 3
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(
                "query, key and value must all be 2-D (L, E) unbatched or 3-D batched, got "
                f"shapes {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
            )
        if not batched:
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        # Now (N, L, E), (N, S, kdim), (N, S, vdim).
        n, lq, e = query.shape
        s = key.shape[1]
        h, hd = self.num_heads, self.head_dim
        if e != self.embed_dim:
            raise ValueError(f"query embedding dim {e} != embed_dim {self.embed_dim}")
        if key.shape[:2] != value.shape[:2] or key.shape[0] != n:
            raise ValueError(
                f"key {tuple(key.shape)} and value {tuple(value.shape)} must share batch and "
                f"sequence sizes with batch {n}"
            )
        if key.shape[-1] != self.kdim or value.shape[-1] != self.vdim:
            raise ValueError(
                f"key/value feature dims {key.shape[-1]}/{value.shape[-1]} != kdim/vdim "
                f"{self.kdim}/{self.vdim}"
            )
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint (as torch.nn.MultiheadAttention)"
            )

        q, k, v = self._project(query, key, value)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(n, 1, e)], dim=1)
            v = torch.cat([v, self.bias_v.expand(n, 1, e)], dim=1)
            s += 1
        q, k, v = (t.reshape(n, -1, h, hd).transpose(1, 2) for t in (q, k, v))
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(n, h, 1, hd)], dim=2)
            v = torch.cat([v, v.new_zeros(n, h, 1, hd)], dim=2)
            s += 1

        bias = self._merged_mask(attn_mask, key_padding_mask, n, lq, s, q.dtype)
        dropout_p = self.dropout if self.training else 0.0
        causal = is_causal and key_padding_mask is None and not need_weights
        if causal:
            bias = None  # attn_mask is the causal mask (the hint), as torch's SDPA path assumes
        out = scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=dropout_p, is_causal=causal
        )
        out = self.out_proj(out.transpose(1, 2).reshape(n, lq, e))

        weights = None
        if need_weights:
            scores = torch.matmul(q, k.transpose(-1, -2)) * (hd**-0.5)
            if bias is not None:
                scores = scores + bias
            weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _project(self, query, key, value):
        e = self.embed_dim
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else (b[:e], b[e : 2 * e], b[2 * e :])
        if self._qkv_same_embed_dim:
            w = self.in_proj_weight
            if query is key and key is value:  # self-attention: one GEMM, as torch does
                return F.linear(query, w, b).chunk(3, dim=-1)
            wq, wk, wv = w[:e], w[e : 2 * e], w[2 * e :]
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)

    def _merged_mask(self, attn_mask, key_padding_mask, n, lq, s, dtype):
        """attn_mask ((L, S) or (N*H, L, S)) and key_padding_mask ((N, S)) as one additive mask
        broadcastable to (N, H, L, S), padded for bias_k / zero attention."""
        h = self.num_heads
        extra = int(self.bias_k is not None) + int(self.add_zero_attn)
        bias = None
        if attn_mask is not None:
            if attn_mask.dim() == 2 and attn_mask.shape == (lq, s - extra):
                bias = _additive(attn_mask, dtype)[None, None]
            elif attn_mask.dim() == 3 and attn_mask.shape == (n * h, lq, s - extra):
                bias = _additive(attn_mask, dtype).view(n, h, lq, s - extra)
            else:
                raise ValueError(
                    f"attn_mask must have shape ({lq}, {s - extra}) or ({n * h}, {lq}, "
                    f"{s - extra}), got {tuple(attn_mask.shape)}"
                )
        if key_padding_mask is not None:
            if key_padding_mask.shape != (n, s - extra):
                raise ValueError(
                    f"key_padding_mask must have shape ({n}, {s - extra}), got "
                    f"{tuple(key_padding_mask.shape)}"
                )
            pad = _additive(key_padding_mask, dtype)[:, None, None, :]
            bias = pad if bias is None else bias + pad
        if bias is not None and extra:
            bias = F.pad(bias, (0, extra))
        return bias


# ---------------------------------------------------------------------------------------------
# transformers
# ---------------------------------------------------------------------------------------------


def transformers_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    position_bias: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function (the ``sdpa_attention_forward`` calling convention):
    query (B, Hq, Lq, D), key/value (B, Hk, Lk, D) (GQA without repeating K/V), the bool mask
    of ``sdpa_mask`` or an additive float mask; returns ((B, Lq, Hq, D), None)."""
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("dlcore attention has no attention sinks (s_aux)")
    lq, lk = query.shape[2], key.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = bool(lq > 1 and attention_mask is None and is_causal)
    if is_causal and lk > lq:
        # Prefill into an empty static cache: the keys past Lq are unwritten slots (as sdpa).
        key, value = key[:, :, :lq], value[:, :, :lq]
        if position_bias is not None:
            position_bias = position_bias[..., :lq]
    bias = attention_mask
    if position_bias is not None:
        bias = position_bias if bias is None else _combine(position_bias, bias)
    window = (-1, -1)
    if sliding_window is not None and bias is None and is_causal:
        window = (int(sliding_window) - 1, 0)  # transformers: visible iff i - j < sliding_window
    if bias is not None and is_causal:
        causal_mask = torch.ones(lq, key.shape[2], dtype=torch.bool, device=query.device).tril()
        bias = _combine(bias, causal_mask)
        is_causal = False
    out = flash_attn_func(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        dropout_p=dropout,
        softmax_scale=scaling,
        causal=is_causal,
        window_size=window,
        softcap=float(softcap or 0.0),
        attn_bias=bias,
    )
    return out.contiguous(), None


def _combine(bias: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """An additive bias restricted by a bool (True = attend) or additive float mask."""
    if mask.dtype == torch.bool:
        return bias.masked_fill(~mask, float("-inf"))
    return bias + mask


def _register_transformers() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("dlcore", transformers_attention_forward)
    # Bool masks (True = attend), or None when causality alone describes the mask.
    AttentionMaskInterface.register("dlcore", sdpa_mask)


if importlib.util.find_spec("transformers") is not None:
    _register_transformers()


# ---------------------------------------------------------------------------------------------
# diffusers
# ---------------------------------------------------------------------------------------------


class AttnProcessor:
    """diffusers attention processor: ``AttnProcessor2_0``'s computation (spatial/group norm,
    q/k norms, cross-attention norm, masks, residual, output rescale) with the attention in
    ``dlcore.scaled_dot_product_attention``, using the module's ``scale``."""

    @classmethod
    def for_attention(cls, attn: nn.Module, old: Any = None) -> AttnProcessor:
        """The processor replacing ``old`` on ``attn``; raises NotImplementedError for processors
        that compute something else (added KV projections, IP adapters, joint attention...)."""
        from diffusers.models import attention_processor as ap

        if old is not None and type(old) not in (ap.AttnProcessor, ap.AttnProcessor2_0):
            raise NotImplementedError(
                f"dlcore.nn.AttnProcessor replaces AttnProcessor/AttnProcessor2_0 only, not "
                f"{type(old).__name__}"
            )
        if getattr(attn, "added_kv_proj_dim", None) is not None:
            raise NotImplementedError("attention with added key/value projections")
        return cls()

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, kv_len, _ = context.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, kv_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            context = hidden_states  # self-attention keys/values come from the normed states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(context)
        value = attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (
            t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value)
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, scale=attn.scale
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[0](hidden_states.to(query.dtype))
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor
