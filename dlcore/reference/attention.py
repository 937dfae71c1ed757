"""Eager attention references: the executable specification of dlcore's attention ops.

Everything is computed in the inputs' dtype (float64 works) and materialises the (Lq, Lk) score
matrix. ``attention_reference`` is the kernel contract of ``dlcore/ops/attention.py`` in the
(B, H, L, D) layout; ``sdpa_reference`` and ``flash_attn_reference`` map the PyTorch SDPA and
flash-attn argument conventions onto it, ``flash_attn_varlen_reference`` and
``flash_attn_kvcache_reference`` handle packed and cached batches one sequence at a time.

Score of query i and key j (flash-attn's order: softcap before ALiBi and bias)::

    s = scale * <q_i, k_j>;  if softcap > 0: s = softcap * tanh(s / softcap)
    s += bias[i, j] - slope_h * |i + diag_offset - j|

Key j is visible to query i iff ``window_left < 0 or j >= i + diag_offset - window_left``,
``window_right < 0 or j <= i + diag_offset + window_right`` and ``s != -inf``. Rows without a
visible key give out = 0 and lse = -inf.
"""

from __future__ import annotations

import math

import torch


def visibility_mask(
    lq: int,
    lk: int,
    diag_offset: int | torch.Tensor = 0,
    window_left: int = -1,
    window_right: int = -1,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """True where key j is visible to query i: (Lq, Lk), (B, 1, Lq, Lk) for a per-batch
    ``diag_offset`` tensor, or a scalar True without a window."""
    i = torch.arange(lq, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    diag = (
        diag_offset.to(device).view(-1, 1, 1, 1)
        if isinstance(diag_offset, torch.Tensor)
        else diag_offset
    )
    visible = torch.ones((), dtype=torch.bool, device=device)
    if window_left >= 0:
        visible = visible & (j >= i + diag - window_left)
    if window_right >= 0:
        visible = visible & (j <= i + diag + window_right)
    return visible


def attention_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    bias: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    scale: float | None = None,
    diag_offset: int | torch.Tensor = 0,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Scores (B, Hq, Lq, Lk) with invisible keys at -inf; k may have fewer heads (GQA)."""
    hq, hk = q.shape[1], k.shape[1]
    if hq != hk:
        k = k.repeat_interleave(hq // hk, dim=1)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    lq, lk = q.shape[2], k.shape[2]
    if alibi_slopes is not None:
        i = torch.arange(lq, device=q.device)[:, None]
        j = torch.arange(lk, device=q.device)[None, :]
        if isinstance(diag_offset, torch.Tensor):
            dist = (i[None] + diag_offset.view(-1, 1, 1).to(q.device) - j[None]).abs()[:, None]
        else:
            dist = (i + diag_offset - j).abs()
        slopes = alibi_slopes.to(s.dtype).expand(q.shape[0], hq)[:, :, None, None]
        s = s - slopes * dist.to(s.dtype)
    if bias is not None:
        s = s + bias.to(s.dtype)
    visible = visibility_mask(lq, lk, diag_offset, window_left, window_right, q.device)
    return s.masked_fill(~visible, float("-inf"))


def _softmax_with_lse(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lse, p) over the last dim; rows with no visible key get lse = -inf and p = 0, with finite
    gradients (the softmax runs on a zeroed row that is then masked)."""
    empty = (s == float("-inf")).all(dim=-1, keepdim=True)
    s = s.masked_fill(empty, 0.0)
    lse = torch.logsumexp(s, dim=-1).masked_fill(empty[..., 0], float("-inf"))
    return lse, torch.softmax(s, dim=-1).masked_fill(empty, 0.0)


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    scale: float | None = None,
    diag_offset: int | torch.Tensor = 0,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    dropout_p: float = 0.0,
    keep_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel contract in (B, H, L, D) layout: returns (out (B,Hq,Lq,D), lse (B,Hq,Lq)).

    ``bias`` broadcasts to (B, Hq, Lq, Lk) (bool: True = attend); ``alibi_slopes`` is (Hq,) or
    (B, Hq); ``diag_offset`` is an int or a per-batch (B,) tensor. Dropout needs the keep mask
    (bool, broadcastable to the scores) because each backend draws its own random stream; kept
    probabilities are scaled by 1 / (1 - dropout_p). lse is taken before dropout.
    """
    if bias is not None and bias.dtype == torch.bool:
        bias = torch.zeros(bias.shape, dtype=q.dtype, device=q.device).masked_fill(
            ~bias, float("-inf")
        )
    s = attention_scores(
        q, k, bias, alibi_slopes, scale, diag_offset, window_left, window_right, softcap
    )
    lse, p = _softmax_with_lse(s)
    if dropout_p > 0:
        if keep_mask is None:
            raise ValueError("attention_reference: dropout_p > 0 needs the keep_mask it applies")
        p = p * keep_mask.to(p.dtype) / (1.0 - dropout_p)
    hq, hk = q.shape[1], v.shape[1]
    if hq != hk:
        v = v.repeat_interleave(hq // hk, dim=1)
    return torch.matmul(p, v), lse


def attention_probs(*args, **kwargs) -> torch.Tensor:
    """Softmax probabilities (B, Hq, Lq, Lk) (0 for invisible keys), same arguments as
    ``attention_scores``; what flash-attn's ``return_attn_probs`` exposes (before dropout)."""
    return _softmax_with_lse(attention_scores(*args, **kwargs))[1]


def sdpa_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    keep_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """torch SDPA semantics ((..., H, L, D), top-left causal) except that fully masked rows give
    0 instead of NaN. ``enable_gqa`` is accepted for signature parity: GQA is always allowed."""
    lead = query.shape[:-3]
    q = query.reshape(-1, *query.shape[-3:])
    k = key.reshape(-1, *key.shape[-3:])
    v = value.reshape(-1, *value.shape[-3:])
    bias = None
    if attn_mask is not None:
        bias = attn_mask
        if bias.dim() > 4:
            bias = bias.reshape(-1, *bias.shape[-3:])
        while bias.dim() < 4:
            bias = bias.unsqueeze(0)
    out, _ = attention_reference(
        q,
        k,
        v,
        bias=bias,
        scale=scale,
        window_right=0 if is_causal else -1,
        dropout_p=dropout_p,
        keep_mask=keep_mask,
    )
    return out.reshape(*lead, *out.shape[1:])


def flash_attn_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    attn_bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    keep_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """flash-attn semantics in (B, L, H, D) layout, bottom-right aligned causal/window:
    returns (out (B, Lq, Hq, D), lse (B, Hq, Lq))."""
    lq, lk = q.shape[1], k.shape[1]
    left, right = window_size
    if causal:
        right = 0
    out, lse = attention_reference(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        bias=attn_bias,
        alibi_slopes=alibi_slopes,
        scale=softmax_scale,
        diag_offset=lk - lq,
        window_left=left,
        window_right=right,
        softcap=softcap,
        dropout_p=dropout_p,
        keep_mask=keep_mask,
    )
    return out.transpose(1, 2), lse


def flash_attn_varlen_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed (total, H, D) sequences, one ``flash_attn_reference`` call each: returns
    (out (total_q, Hq, D), lse (Hq, total_q)). ``alibi_slopes`` may be (B, Hq)."""
    outs, lses = [], []
    alibi = kwargs.pop("alibi_slopes", None)
    for b in range(cu_seqlens_q.numel() - 1):
        sq = slice(int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1]))
        sk = slice(int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1]))
        slopes = None if alibi is None else (alibi[b] if alibi.dim() == 2 else alibi)
        o, lse = flash_attn_reference(
            q[None, sq], k[None, sk], v[None, sk], alibi_slopes=slopes, **kwargs
        )
        outs.append(o[0])
        lses.append(lse[0])
    return torch.cat(outs, 0), torch.cat(lses, 1)


def flash_attn_kvcache_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoding attention over the first ``cache_seqlens[b]`` cached keys of each batch row
    ((B, L, H, D) layout; new keys must already be in the cache): (out, lse (B, Hq, Lq))."""
    outs, lses = [], []
    alibi = kwargs.pop("alibi_slopes", None)
    for b in range(q.shape[0]):
        n = int(cache_seqlens[b])
        slopes = None if alibi is None else (alibi[b] if alibi.dim() == 2 else alibi)
        o, lse = flash_attn_reference(
            q[b : b + 1],
            k_cache[b : b + 1, :n],
            v_cache[b : b + 1, :n],
            alibi_slopes=slopes,
            **kwargs,
        )
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, 0), torch.cat(lses, 0)
