"""Fused attention ops: SDPA- and flash-attn-compatible entry points over one kernel contract.

Kernel contract (the Triton launchers in ``dlcore/kernels/attention.py`` and the C++ ops
``torch.ops.dlcore.attention_fwd_kernel`` / ``attention_bwd_kernel`` of ``csrc/cpu/attention.cpp``
implement it; ``dlcore.reference.attention.attention_reference`` is its executable form):

``fwd(q, k, v, bias, alibi_slopes, scale, diag_offset, window_left, window_right, softcap,
dropout_p, seed, out, lse)`` writes ``out`` and ``lse``.

- q (B, Hq, Lq, D), k and v (B, Hk, Lk, D): any strides with stride(-1) == 1 (the flash layout
  (B, L, H, D) arrives as a permuted view, not a copy); Hq % Hk == 0 and query head h reads KV
  head h // (Hq // Hk) (GQA/MQA); any D <= 256; q, k, v share a dtype (fp32/fp16/bf16).
- bias: None or a float tensor viewed as (B, Hq, Lq, Lk), zero strides on broadcast dims, added in
  fp32, -inf allowed. Bool masks (True = attend, SDPA semantics) become a 0/-inf fp32 bias of the
  mask's own shape, expanded without materialising (B, Hq, Lq, Lk).
- alibi_slopes: None or fp32 (B, Hq), possibly with a zero batch stride.
- score s_ij = scale * <q_i, k_j>; if softcap > 0, s = softcap * tanh(s / softcap); then
  s += bias_ij - slope_h * |i + diag_offset - j| (flash-attn's order: softcap, then ALiBi/bias).
- key j is visible to query i iff (window_left < 0 or j >= i + diag_offset - window_left) and
  (window_right < 0 or j <= i + diag_offset + window_right) and s_ij != -inf. Causal is
  window_right = 0; diag_offset = 0 is SDPA's top-left causal, Lk - Lq flash-attn's bottom-right.
- softmax over the visible keys; lse (B, Hq, Lq) fp32 natural-log logsumexp of the visible
  scores (before dropout); a row without a visible key gives out = 0 and lse = -inf, never NaN.
- dropout: keep with probability 1 - p, kept values scaled by 1 / (1 - p); the mask is a
  counter-based RNG of (seed, ((b*Hq + h)*Lq + i)*Lk + j), so backward regenerates it. Backends
  need not share a random stream; each is consistent between its forward and backward.
- out (B, Hq, Lq, D) in q's dtype.

``bwd(dout, q, k, v, out, lse, bias, alibi_slopes, scale, diag_offset, window_left, window_right,
softcap, dropout_p, seed, deterministic, dq, dk, dv)`` writes dq (like q) and dk, dv (B, Hk, Lk, D)
(summed over each KV group). deterministic=True gives bit-identical gradients run to run.

This module maps SDPA semantics (top-left causal, bool/float masks) and flash-attn semantics
(bottom-right causal, windows, ALiBi, softcap, varlen, kv cache) onto the contract, validates
inputs with messages naming the argument and shapes, registers the custom ops (fake impls,
autograd) and dispatches to the triton, cpu (when its kernel is built) and eager backends.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

from ..backends import triton_kernels
from ..reference import attention as ref
from .common import (
    FLOAT_DTYPES,
    dispatch,
    last_dim_contiguous,
    needs_registered_op,
    register_autograd,
)

MAX_HEAD_DIM = 256


# ---------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------


@functools.cache
def _has_cpu_kernel() -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(
            "dlcore::attention_fwd_kernel", "CPU"
        ) and torch._C._dispatch_has_kernel_for_dispatch_key("dlcore::attention_bwd_kernel", "CPU")
    except RuntimeError:  # schema not registered: the C++ extension is not built
        return False


def implemented_backends() -> tuple[str, ...]:
    """Backends the attention ops can run on this build (cpu only once its kernel exists)."""
    return ("triton", "cpu", "eager") if _has_cpu_kernel() else ("triton", "eager")


def _triton():
    return triton_kernels("attention")


def _gpu_dtypes(impls: dict, q: torch.Tensor) -> dict:
    """The triton backend takes fp16/bf16 on GPUs (fp32 tiles with fp32-accurate products spill
    registers); fp32 CUDA inputs run on the eager backend. CPU tensors (interpreter) take all."""
    if q.device.type == "cuda" and q.dtype == torch.float32:
        return {name: fn for name, fn in impls.items() if name != "triton"}
    return impls


def _eager_keep_mask(seed: int, p: float, shape: Sequence[int], device) -> torch.Tensor:
    """The eager backend's dropout mask: a torch generator seeded with ``seed`` (the eager
    backend's own counter-based stream, regenerated identically in backward)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return (torch.rand(tuple(shape), generator=gen) >= p).to(device)


# ---------------------------------------------------------------------------------------------
# Dense op: attention_fwd / attention_bwd
# ---------------------------------------------------------------------------------------------


def _layout_of(t: torch.Tensor, template: torch.Tensor) -> torch.Tensor:
    """``t`` with ``template``'s strides, as the fake impls (``empty_like``) promise: compiled
    graphs rely on them, e.g. when a transposed (B, L, H, D) view is reshaped afterwards."""
    if t.stride() == template.stride():
        return t
    return torch.empty_like(template, dtype=t.dtype).copy_(t)


def _eager_fwd(q, k, v, bias, alibi, scale, diag, wl, wr, softcap, p, seed):
    keep = None
    if p > 0:
        keep = _eager_keep_mask(seed, p, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]), q.device)
    out, lse = ref.attention_reference(
        q, k, v, bias, alibi, scale, diag, wl, wr, softcap, dropout_p=p, keep_mask=keep
    )
    return _layout_of(out.to(q.dtype), q), lse.float().contiguous()


def _eager_bwd(dout, q, k, v, bias, alibi, scale, diag, wl, wr, softcap, p, seed):
    """Closed-form backward of the reference (custom-op bodies run below autograd)."""
    b, hq, lq, _ = q.shape
    hk, lk = k.shape[1], k.shape[2]
    group = hq // hk
    kx, vx = (t.repeat_interleave(group, dim=1) for t in (k, v))
    s = ref.attention_scores(q, k, bias, alibi, scale, diag, wl, wr, softcap)
    _, probs = ref._softmax_with_lse(s)
    dp = torch.matmul(dout, vx.transpose(-1, -2))
    used = probs
    if p > 0:
        keep = _eager_keep_mask(seed, p, (b, hq, lq, lk), q.device).to(q.dtype) / (1.0 - p)
        used, dp = probs * keep, dp * keep
    ds = probs * (dp - (probs * dp).sum(-1, keepdim=True))
    if softcap > 0:
        t = torch.tanh(torch.matmul(q, kx.transpose(-1, -2)) * (scale / softcap))
        ds = ds * (1 - t * t)
    dq = torch.matmul(ds, kx) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q) * scale
    dv = torch.matmul(used.transpose(-1, -2), dout)
    dk, dv = (t.view(b, hk, group, lk, t.shape[-1]).sum(2) for t in (dk, dv))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _attention_fwd_body(
    q, k, v, bias, alibi_slopes, scale, diag_offset, window_left, window_right, softcap,
    dropout_p, seed,
):  # fmt: skip
    """``attention_fwd``'s body: the backend's kernel (or the eager reference)."""
    args = (q, k, v, bias, alibi_slopes, scale, diag_offset, window_left, window_right, softcap)

    def kernel(fn):
        def run():
            out = torch.empty_like(q)
            lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
            fn(*args, dropout_p, seed, out, lse)
            return out, lse

        return run

    impls = {
        "triton": kernel(lambda *a: _triton().attention_fwd(*a)),
        "eager": lambda: _eager_fwd(*args, dropout_p, seed),
    }
    if _has_cpu_kernel():
        impls["cpu"] = kernel(torch.ops.dlcore.attention_fwd_kernel)
    return dispatch("attention_fwd", _gpu_dtypes(impls, q), q.device)


@torch.library.custom_op("dlcore::attention_fwd", mutates_args=())
def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    alibi_slopes: torch.Tensor | None,
    scale: float,
    diag_offset: int,
    window_left: int,
    window_right: int,
    softcap: float,
    dropout_p: float,
    seed: int,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The contract's forward on (B, H, L, D) views: returns (out like q, lse (B, Hq, Lq)).
    ``deterministic`` only selects the backward algorithm."""
    return _attention_fwd_body(
        q, k, v, bias, alibi_slopes, scale, diag_offset, window_left, window_right, softcap,
        dropout_p, seed,
    )  # fmt: skip


@attention_fwd.register_fake
def _(q, k, v, bias, alibi, scale, diag, wl, wr, softcap, p, seed, det):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


def _run_fwd(q, k, v, bias, alibi_slopes, *scalars):
    """``attention_fwd(q, k, v, bias, alibi_slopes, *scalars)``. Where nothing needs the op
    wrapper (inference), its body runs directly: the wrapper's per-call bookkeeping (~20 us)
    is as long as the kernel of a small attention, e.g. diffusers' 8-wide heads at 16x16."""
    if needs_registered_op((q, k, v, bias, alibi_slopes)):
        return attention_fwd(q, k, v, bias, alibi_slopes, *scalars)
    return _attention_fwd_body(q, k, v, bias, alibi_slopes, *scalars[:-1])


@torch.library.custom_op("dlcore::attention_bwd", mutates_args=())
def attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    bias: torch.Tensor | None,
    alibi_slopes: torch.Tensor | None,
    scale: float,
    diag_offset: int,
    window_left: int,
    window_right: int,
    softcap: float,
    dropout_p: float,
    seed: int,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The contract's backward: (dq like q, dk like k, dv like v)."""
    scalars = (scale, diag_offset, window_left, window_right, softcap, dropout_p, seed)

    def kernel(fn):
        def run():
            dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
            fn(dout, q, k, v, out, lse, bias, alibi_slopes, *scalars, deterministic, dq, dk, dv)
            return dq, dk, dv

        return run

    impls = {
        "triton": kernel(lambda *a: _triton().attention_bwd(*a)),
        "eager": lambda: tuple(
            _layout_of(g, t)
            for g, t in zip(
                _eager_bwd(dout, q, k, v, bias, alibi_slopes, *scalars), (q, k, v), strict=True
            )
        ),
    }
    if _has_cpu_kernel():
        impls["cpu"] = kernel(torch.ops.dlcore.attention_bwd_kernel)
    return tuple(dispatch("attention_bwd", _gpu_dtypes(impls, q), q.device))


@attention_bwd.register_fake
def _(dout, q, k, v, out, lse, bias, alibi, scale, diag, wl, wr, softcap, p, seed, det):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fwd_setup_context(ctx, inputs, output):
    q, k, v, bias, alibi, scale, diag, wl, wr, softcap, p, seed, det = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, bias, alibi)
    ctx.scalars = (scale, diag, wl, wr, softcap, p, seed)
    ctx.deterministic = det
    ctx.mark_non_differentiable(lse)


def _bias_grad(dout, q, k, v, out, lse, bias, alibi, scale, diag, wl, wr, softcap):
    """dL/dbias = dS = P * (dO V^T - rowsum(dO * O)) from the saved lse, in fp32. It is as large
    as the scores, so it is only computed when the bias requires a gradient (no dropout)."""
    q32, k32, v32, do32 = (t.float() for t in (q, k, v, dout))
    s = ref.attention_scores(q32, k32, bias, alibi, scale, diag, wl, wr, softcap)
    probs = torch.exp(s - lse.masked_fill(torch.isinf(lse), float("inf"))[..., None])
    group = q.shape[1] // k.shape[1]
    dp = torch.matmul(do32, v32.repeat_interleave(group, dim=1).transpose(-1, -2))
    delta = (do32 * out.float()).sum(-1, keepdim=True)
    return probs * (dp - delta)


def _fwd_backward(ctx, dout, dlse):
    q, k, v, out, lse, bias, alibi = ctx.saved_tensors
    dout = last_dim_contiguous(dout)
    dq, dk, dv = attention_bwd(
        dout, q, k, v, out, lse, bias, alibi, *ctx.scalars, ctx.deterministic
    )
    dbias = None
    if ctx.needs_input_grad[3]:
        dbias = _bias_grad(dout, q, k, v, out, lse, bias, alibi, *ctx.scalars[:5])
    return dq, dk, dv, dbias, *([None] * 9)


register_autograd(attention_fwd, _fwd_backward, setup_context=_fwd_setup_context)


def _kernel_fake(*args, **kwargs):
    return None


def _register_kernel_fakes() -> None:
    """Fake impls for the C++ kernel-layer ops (they write their outputs in place)."""
    for name in ("attention_fwd_kernel", "attention_bwd_kernel"):
        try:
            torch.library.register_fake(f"dlcore::{name}")(_kernel_fake)
        except RuntimeError:  # schema absent (extension not built) or already registered
            pass


_register_kernel_fakes()


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_qkv(names: Sequence[str], q, k, v, *, layout: str, ndims: Sequence[int]) -> None:
    """Rank, dtype, device and head-dim checks shared by every entry point."""
    for name, t in zip(names, (q, k, v), strict=True):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() not in ndims:
            raise ValueError(
                f"{name} must have {' or '.join(map(str, ndims))} dimensions {layout}, "
                f"got shape {_shape(t)}"
            )
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be float32, float16 or bfloat16, got {str(t.dtype)[6:]}")
    qn, kn, vn = names
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(
            f"{qn}, {kn}, {vn} must share a dtype, got {str(q.dtype)[6:]}, {str(k.dtype)[6:]}, "
            f"{str(v.dtype)[6:]}"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"{qn}, {kn}, {vn} must be on one device, got {q.device}, {k.device}, {v.device}"
        )
    d = q.shape[-1]
    if k.shape[-1] != d or v.shape[-1] != d:
        raise ValueError(
            f"head dims differ: {qn} {_shape(q)}, {kn} {_shape(k)}, {vn} {_shape(v)} "
            f"(the last dimension must match; value head dims other than the query's are not "
            f"supported)"
        )
    if not 0 < d <= MAX_HEAD_DIM:
        raise ValueError(
            f"head dim of {qn} must be in [1, {MAX_HEAD_DIM}], got {d} (shape {_shape(q)})"
        )


def _check_heads(names: Sequence[str], hq: int, hk: int, q, k) -> None:
    if hk == 0 or hq % hk != 0:
        raise ValueError(
            f"{names[0]} has {hq} heads, which is not a multiple of the {hk} heads of "
            f"{names[1]}/{names[2]} (grouped-query attention needs Hq % Hk == 0); shapes "
            f"{_shape(q)} and {_shape(k)}"
        )


def _check_dropout(dropout_p: float) -> None:
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


def _bias_4d(name: str, mask: torch.Tensor, full: tuple[int, int, int, int], q) -> torch.Tensor:
    """A bool/float mask broadcastable to ``full`` (B, H, Lq, Lk) as an fp32 additive bias view
    of ``full`` (broadcast dims keep stride 0: nothing of size B*H*Lq*Lk is materialised)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise ValueError(f"{name} must be bool or floating point, got {str(mask.dtype)[6:]}")
    if mask.device != q.device:
        raise ValueError(f"{name} must be on {q.device} like the query, got {mask.device}")
    try:
        ok = mask.dim() <= 4 and torch.broadcast_shapes(_shape(mask), full) == full
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"{name} of shape {_shape(mask)} is not broadcastable to the attention scores "
            f"(batch, heads, L_q, L_k) = {full}"
        )
    if mask.dtype == torch.bool:
        bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        bias = bias.masked_fill_(~mask, float("-inf"))
    else:
        bias = mask.float()
    while bias.dim() < 4:
        bias = bias.unsqueeze(0)
    return bias.expand(full)


def _check_bias_grad(name: str, mask, dropout_p: float) -> None:
    if mask is not None and mask.requires_grad and dropout_p > 0 and torch.is_grad_enabled():
        raise ValueError(
            f"{name} requires a gradient, which dlcore computes only without dropout "
            f"(got dropout_p={dropout_p}); detach it or set dropout_p=0"
        )


def _check_window(window_size, causal: bool) -> tuple[int, int]:
    if (
        not isinstance(window_size, (tuple, list))
        or len(window_size) != 2
        or not all(isinstance(w, int) and not isinstance(w, bool) for w in window_size)
    ):
        raise ValueError(f"window_size must be a pair of ints (left, right), got {window_size!r}")
    left, right = window_size
    if left < -1 or right < -1:
        raise ValueError(
            f"window_size entries must be >= 0 or -1 (unbounded), got {tuple(window_size)}"
        )
    if causal:
        if right > 0:
            raise ValueError(
                f"causal=True sees no key right of the diagonal, but window_size="
                f"{tuple(window_size)} asks for a right window > 0: pass causal=False with that "
                "window instead"
            )
        right = 0
    return left, right


def _alibi(alibi_slopes, b: int, hq: int, q) -> torch.Tensor | None:
    if alibi_slopes is None:
        return None
    if not isinstance(alibi_slopes, torch.Tensor) or not alibi_slopes.is_floating_point():
        raise ValueError(
            "alibi_slopes must be a floating point tensor of shape (nheads,) or (batch, nheads)"
        )
    if _shape(alibi_slopes) not in ((hq,), (b, hq)):
        raise ValueError(
            f"alibi_slopes must have shape ({hq},) or ({b}, {hq}) (nheads of q), got "
            f"{_shape(alibi_slopes)}"
        )
    if alibi_slopes.device != q.device:
        raise ValueError(f"alibi_slopes must be on {q.device}, got {alibi_slopes.device}")
    slopes = alibi_slopes.float()
    return slopes.expand(b, hq) if slopes.dim() == 1 else slopes


def _check_softcap(softcap: float) -> float:
    if softcap < 0:
        raise ValueError(f"softcap must be >= 0 (0 disables it), got {softcap}")
    return float(softcap)


def _new_seed(dropout_p: float) -> int:
    """Dropout seed drawn from torch's default generator (so torch.manual_seed reproduces it)."""
    return int(torch.randint(0, 2**62, (1,)).item()) if dropout_p > 0 else 0


def _scale(scale: float | None, d: int) -> float:
    return 1.0 / math.sqrt(d) if scale is None else float(scale)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention``: (..., H, L, D) inputs,
    bool (True = attend) or float masks broadcast to (..., H, Lq, Lk), top-left causal, GQA with
    ``enable_gqa``. Unlike torch, a fully masked row gives 0 instead of NaN."""
    names = ("query", "key", "value")
    _check_qkv(names, query, key, value, layout="(batch, heads, L, head_dim)", ndims=(3, 4))
    if query.dim() != key.dim() or key.shape != value.shape:
        raise ValueError(
            f"key and value must have the same shape and the rank of query, got query "
            f"{_shape(query)}, key {_shape(key)}, value {_shape(value)}"
        )
    q, k, v = (t if t.dim() == 4 else t.unsqueeze(1) for t in (query, key, value))
    b, hq, lq, d = q.shape
    hk, lk = k.shape[1], k.shape[2]
    if k.shape[0] != b:
        raise ValueError(f"batch sizes differ: query {_shape(query)}, key {_shape(key)}")
    if hq != hk and not enable_gqa:
        raise ValueError(
            f"query has {hq} heads but key/value have {hk} (shapes {_shape(query)}, "
            f"{_shape(key)}): pass enable_gqa=True for grouped-query attention"
        )
    _check_heads(names, hq, hk, query, key)
    _check_dropout(dropout_p)
    if is_causal and attn_mask is not None:
        raise ValueError("pass either attn_mask or is_causal=True, not both (as torch SDPA)")
    bias = None
    if attn_mask is not None:
        if query.dim() == 3 and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(1)
        bias = _bias_4d("attn_mask", attn_mask, (b, hq, lq, lk), query)
        _check_bias_grad("attn_mask", attn_mask, dropout_p)
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    out, _ = _run_fwd(
        q, k, v, bias, None, _scale(scale, d), 0, -1, 0 if is_causal else -1, 0.0,
        float(dropout_p), _new_seed(dropout_p), torch.are_deterministic_algorithms_enabled(),
    )  # fmt: skip
    return out if query.dim() == 4 else out.squeeze(1)


def _flash_probs(q, k, bias, alibi, scale, diag, wl, wr, softcap) -> torch.Tensor:
    # Test/inspection only: flash-attn also materialises this when return_attn_probs is set.
    with torch.no_grad():
        return ref.attention_probs(
            q.float(), k.float(), bias, alibi, scale, diag, wl, wr, softcap
        ).to(q.dtype)


def flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    attn_bias: torch.Tensor | None = None,
):
    """Drop-in for ``flash_attn.flash_attn_func``: (B, L, H, D) inputs, bottom-right aligned
    causal/window when Lq != Lk, ALiBi, softcap, GQA/MQA; plus ``attn_bias`` (bool or float,
    broadcastable to (B, Hq, Lq, Lk)). Returns out (B, Lq, Hq, D), or with
    ``return_attn_probs`` (out, softmax_lse (B, Hq, Lq), probs (B, Hq, Lq, Lk) before dropout)."""
    names = ("q", "k", "v")
    _check_qkv(names, q, k, v, layout="(batch, seqlen, nheads, head_dim)", ndims=(4,))
    b, lq, hq, d = q.shape
    lk, hk = k.shape[1], k.shape[2]
    if k.shape != v.shape or k.shape[0] != b:
        raise ValueError(
            f"k and v must have the same shape with q's batch size, got q {_shape(q)}, "
            f"k {_shape(k)}, v {_shape(v)}"
        )
    _check_heads(names, hq, hk, q, k)
    _check_dropout(dropout_p)
    wl, wr = _check_window(window_size, causal)
    softcap = _check_softcap(softcap)
    alibi = _alibi(alibi_slopes, b, hq, q)
    bias = None if attn_bias is None else _bias_4d("attn_bias", attn_bias, (b, hq, lq, lk), q)
    _check_bias_grad("attn_bias", attn_bias, dropout_p)
    qt, kt, vt = (last_dim_contiguous(t).transpose(1, 2) for t in (q, k, v))
    scale = _scale(softmax_scale, d)
    diag = lk - lq
    out, lse = _run_fwd(
        qt, kt, vt, bias, alibi, scale, diag, wl, wr, softcap, float(dropout_p),
        _new_seed(dropout_p), bool(deterministic) or torch.are_deterministic_algorithms_enabled(),
    )  # fmt: skip
    out = out.transpose(1, 2)
    if not return_attn_probs:
        return out
    return out, lse, _flash_probs(qt, kt, bias, alibi, scale, diag, wl, wr, softcap)


# ---------------------------------------------------------------------------------------------
# Varlen ops (packed sequences) and the kv-cache op
# ---------------------------------------------------------------------------------------------


def _seq_bounds(cu: torch.Tensor) -> list[tuple[int, int]]:
    c = cu.tolist()
    return list(zip(c[:-1], c[1:], strict=True))


def _bhld(t: torch.Tensor) -> torch.Tensor:
    """(L, H, D) packed slice -> (1, H, L, D) view."""
    return t.transpose(0, 1).unsqueeze(0)


def _varlen_loop_fwd(fwd, q, k, v, cu_q, cu_k, alibi, scale, wl, wr, softcap, p, seed):
    """Run a dense (B=1) forward per packed sequence: (out (Tq, Hq, D), lse (Hq, Tq))."""
    out = torch.empty_like(q)
    lse = torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device)
    for i, ((q0, q1), (k0, k1)) in enumerate(
        zip(_seq_bounds(cu_q), _seq_bounds(cu_k), strict=True)
    ):
        if q1 == q0:
            continue
        slopes = None if alibi is None else alibi[i : i + 1]
        o, lse_i = fwd(
            _bhld(q[q0:q1]), _bhld(k[k0:k1]), _bhld(v[k0:k1]), None, slopes, scale,
            (k1 - k0) - (q1 - q0), wl, wr, softcap, p, seed + i,
        )  # fmt: skip
        out[q0:q1] = o[0].transpose(0, 1)
        lse[:, q0:q1] = lse_i[0]
    return out, lse


def _cpu_dense_fwd(q, k, v, bias, alibi, scale, diag, wl, wr, softcap, p, seed):
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    torch.ops.dlcore.attention_fwd_kernel(
        q, k, v, bias, alibi, scale, diag, wl, wr, softcap, p, seed, out, lse
    )
    return out, lse


@torch.library.custom_op("dlcore::attention_varlen_fwd", mutates_args=())
def attention_varlen_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    alibi_slopes: torch.Tensor | None,
    scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    dropout_p: float,
    seed: int,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed sequences q (Tq, Hq, D), k/v (Tk, Hk, D), bottom-right aligned per sequence:
    returns (out (Tq, Hq, D), lse (Hq, Tq))."""
    loop_args = (q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, scale, window_left)
    loop_args += (window_right, softcap, dropout_p, seed)

    def triton_impl():
        out = torch.empty_like(q)
        lse = torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device)
        _triton().attention_fwd(
            _bhld(q), _bhld(k), _bhld(v), None, alibi_slopes, scale, 0, window_left,
            window_right, softcap, dropout_p, seed, _bhld(out), lse.unsqueeze(0),
            cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
            max_seqlen_k=max_seqlen_k,
        )  # fmt: skip
        return out, lse

    impls = {
        "triton": triton_impl,
        "eager": lambda: _varlen_loop_fwd(_eager_fwd, *loop_args),
    }
    if _has_cpu_kernel():
        impls["cpu"] = lambda: _varlen_loop_fwd(_cpu_dense_fwd, *loop_args)
    return dispatch("attention_varlen_fwd", _gpu_dtypes(impls, q), q.device)


@attention_varlen_fwd.register_fake
def _(q, k, v, cu_q, cu_k, max_q, max_k, alibi, scale, wl, wr, softcap, p, seed, det):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


def _varlen_loop_bwd(bwd, dout, q, k, v, out, lse, cu_q, cu_k, alibi, scalars, det):
    scale, wl, wr, softcap, p, seed = scalars
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for i, ((q0, q1), (k0, k1)) in enumerate(
        zip(_seq_bounds(cu_q), _seq_bounds(cu_k), strict=True)
    ):
        if q1 == q0:
            continue
        slopes = None if alibi is None else alibi[i : i + 1]
        g = bwd(
            _bhld(dout[q0:q1]), _bhld(q[q0:q1]), _bhld(k[k0:k1]), _bhld(v[k0:k1]),
            _bhld(out[q0:q1]), lse[None, :, q0:q1].contiguous(), slopes, scale,
            (k1 - k0) - (q1 - q0), wl, wr, softcap, p, seed + i, det,
        )  # fmt: skip
        dq[q0:q1], dk[k0:k1], dv[k0:k1] = (x[0].transpose(0, 1) for x in g)
    return dq, dk, dv


def _eager_bwd_seq(dout, q, k, v, out, lse, alibi, scale, diag, wl, wr, softcap, p, seed, det):
    return _eager_bwd(dout, q, k, v, None, alibi, scale, diag, wl, wr, softcap, p, seed)


def _cpu_bwd_seq(dout, q, k, v, out, lse, alibi, scale, diag, wl, wr, softcap, p, seed, det):
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    torch.ops.dlcore.attention_bwd_kernel(
        dout, q, k, v, out, lse, None, alibi, scale, diag, wl, wr, softcap, p, seed, det,
        dq, dk, dv,
    )  # fmt: skip
    return dq, dk, dv


@torch.library.custom_op("dlcore::attention_varlen_bwd", mutates_args=())
def attention_varlen_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    alibi_slopes: torch.Tensor | None,
    scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    dropout_p: float,
    seed: int,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of ``attention_varlen_fwd``: (dq, dk, dv) in the packed layouts."""
    scalars = (scale, window_left, window_right, softcap, dropout_p, seed)
    loop = (dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, scalars)

    def triton_impl():
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _triton().attention_bwd(
            _bhld(dout), _bhld(q), _bhld(k), _bhld(v), _bhld(out), lse.unsqueeze(0),
            None, alibi_slopes, scale, 0, window_left, window_right, softcap, dropout_p, seed,
            deterministic, _bhld(dq), _bhld(dk), _bhld(dv),
            cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
            max_seqlen_k=max_seqlen_k,
        )  # fmt: skip
        return dq, dk, dv

    impls = {
        "triton": triton_impl,
        "eager": lambda: _varlen_loop_bwd(_eager_bwd_seq, *loop, deterministic),
    }
    if _has_cpu_kernel():
        impls["cpu"] = lambda: _varlen_loop_bwd(_cpu_bwd_seq, *loop, deterministic)
    return tuple(dispatch("attention_varlen_bwd", _gpu_dtypes(impls, q), q.device))


@attention_varlen_bwd.register_fake
def _(dout, q, k, v, out, lse, cu_q, cu_k, mq, mk, alibi, scale, wl, wr, softcap, p, seed, det):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _varlen_setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, alibi, scale, wl, wr, softcap, p, seed, det = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, alibi)
    ctx.rest = (max_q, max_k)
    ctx.scalars = (scale, wl, wr, softcap, p, seed, det)


def _varlen_backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k, alibi = ctx.saved_tensors
    dq, dk, dv = attention_varlen_bwd(
        last_dim_contiguous(dout), q, k, v, out, lse, cu_q, cu_k, *ctx.rest, alibi, *ctx.scalars
    )
    return dq, dk, dv, *([None] * 12)


register_autograd(attention_varlen_fwd, _varlen_backward, setup_context=_varlen_setup_context)


@torch.library.custom_op("dlcore::attention_kvcache", mutates_args=())
def attention_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seqlens_k: torch.Tensor,
    cache_batch_idx: torch.Tensor | None,
    alibi_slopes: torch.Tensor | None,
    scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    num_splits: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (B, Lq, Hq, D) over the first ``seqlens_k[b]`` keys of cache row
    ``cache_batch_idx[b]`` (or b) of k/v_cache (Bc, Lmax, Hk, D), bottom-right aligned:
    returns (out (B, Lq, Hq, D), lse (B, Hq, Lq)). Forward only."""
    qt = q.transpose(1, 2)

    def triton_impl():
        out = torch.empty_like(q)
        lse = torch.empty(qt.shape[:3], dtype=torch.float32, device=q.device)
        _triton().attention_fwd(
            qt, k_cache.transpose(1, 2), v_cache.transpose(1, 2), None, alibi_slopes, scale, 0,
            window_left, window_right, softcap, 0.0, 0, out.transpose(1, 2), lse,
            seqlens_k=seqlens_k, batch_idx=cache_batch_idx, num_splits=num_splits,
        )  # fmt: skip
        return out, lse

    def loop(fwd):
        def run():
            outs, lses = [], []
            rows = cache_batch_idx.tolist() if cache_batch_idx is not None else None
            for b, n in enumerate(seqlens_k.tolist()):
                r = rows[b] if rows is not None else b
                o, lse = fwd(
                    qt[b : b + 1], k_cache[r : r + 1, :n].transpose(1, 2),
                    v_cache[r : r + 1, :n].transpose(1, 2), None,
                    None if alibi_slopes is None else alibi_slopes[b : b + 1], scale,
                    n - q.shape[1], window_left, window_right, softcap, 0.0, 0,
                )  # fmt: skip
                outs.append(o.transpose(1, 2))
                lses.append(lse)
            return torch.cat(outs).to(q.dtype), torch.cat(lses)

        return run

    impls = {"triton": triton_impl, "eager": loop(_eager_fwd)}
    if _has_cpu_kernel():
        impls["cpu"] = loop(_cpu_dense_fwd)
    return dispatch("attention_kvcache", _gpu_dtypes(impls, q), q.device)


@attention_kvcache.register_fake
def _(q, k_cache, v_cache, seqlens_k, batch_idx, alibi, scale, wl, wr, softcap, num_splits):
    return torch.empty_like(q), q.new_empty(
        (q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32
    )


def _check_cu_seqlens(name: str, cu, total: int, device, max_seqlen: int, max_name: str) -> None:
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.dtype != torch.int32:
        got = f"{_shape(cu)} {str(cu.dtype)[6:]}" if isinstance(cu, torch.Tensor) else type(cu)
        raise ValueError(f"{name} must be a 1-D int32 tensor (batch + 1,), got {got}")
    if cu.numel() < 2:
        raise ValueError(f"{name} needs at least 2 entries (batch + 1), got {cu.numel()}")
    if cu.device != device:
        raise ValueError(f"{name} must be on {device} like the inputs, got {cu.device}")
    lengths = cu.diff()
    # One host sync: bad offsets would make the kernels read out of bounds.
    first, last, min_len, max_len = (
        int(x) for x in torch.stack([cu[0], cu[-1], lengths.min(), lengths.max()]).tolist()
    )
    if first < 0 or min_len < 0 or last > total:
        raise ValueError(
            f"{name} must be non-decreasing offsets within [0, {total}] (the packed length), "
            f"got {cu.tolist()}"
        )
    if max_len > max_seqlen:
        raise ValueError(
            f"{max_name}={max_seqlen} is smaller than the longest sequence ({max_len})"
        )


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: torch.Tensor | None = None,
):
    """Drop-in for ``flash_attn.flash_attn_varlen_func``: packed q (total_q, Hq, D), k/v
    (total_k, Hk, D), int32 ``cu_seqlens_*`` offsets (batch + 1,), bottom-right aligned causal and
    windows per sequence. Returns out (total_q, Hq, D), or with ``return_attn_probs``
    (out, softmax_lse (Hq, total_q), None): probabilities are not materialised for packed
    batches."""
    if block_table is not None:
        raise ValueError("block_table (paged KV cache) is not supported by dlcore")
    names = ("q", "k", "v")
    _check_qkv(names, q, k, v, layout="(total_tokens, nheads, head_dim)", ndims=(3,))
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {_shape(k)} and {_shape(v)}")
    hq, hk, d = q.shape[1], k.shape[1], q.shape[2]
    _check_heads(names, hq, hk, q, k)
    _check_cu_seqlens(
        "cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device, max_seqlen_q, "max_seqlen_q"
    )
    _check_cu_seqlens(
        "cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device, max_seqlen_k, "max_seqlen_k"
    )
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1), got "
            f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}"
        )
    _check_dropout(dropout_p)
    wl, wr = _check_window(window_size, causal)
    batch = cu_seqlens_q.numel() - 1
    alibi = _alibi(alibi_slopes, batch, hq, q)
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    out, lse = attention_varlen_fwd(
        q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), alibi,
        _scale(softmax_scale, d), wl, wr, _check_softcap(softcap), float(dropout_p),
        _new_seed(dropout_p), bool(deterministic) or torch.are_deterministic_algorithms_enabled(),
    )  # fmt: skip
    return (out, lse, None) if return_attn_probs else out


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool):
    """Rotary embedding of the first 2 * cos.shape[-1] dims of x (B, L, H, D); cos/sin (B, L, R)."""
    rd = 2 * cos.shape[-1]
    cos, sin = cos[:, :, None].to(x.dtype), sin[:, :, None].to(x.dtype)
    rot, rest = x[..., :rd], x[..., rd:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rot = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    else:
        x1, x2 = rot.chunk(2, dim=-1)
        rot = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return torch.cat((rot, rest), dim=-1)


def flash_attn_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    rotary_cos: torch.Tensor | None = None,
    rotary_sin: torch.Tensor | None = None,
    cache_seqlens: int | torch.Tensor | None = None,
    cache_batch_idx: torch.Tensor | None = None,
    cache_leftpad: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    alibi_slopes: torch.Tensor | None = None,
    num_splits: int = 0,
    return_softmax_lse: bool = False,
):
    """Drop-in for ``flash_attn.flash_attn_with_kvcache`` (decoding, forward only).

    q (B, Lq, Hq, D); k_cache/v_cache (B_cache, L_max, Hk, D). New keys/values k, v
    (B, L_new, Hk, D) are written in place at ``cache_seqlens`` (after rotary, when
    ``rotary_cos``/``rotary_sin`` (L_ro, R/2) are given), then q attends to the first
    ``cache_seqlens + L_new`` keys, bottom-right aligned. Splits the keys across programs when
    Lq is small (``num_splits`` 0: heuristic). Returns out, or (out, softmax_lse (B, Hq, Lq))."""
    if block_table is not None or cache_leftpad is not None:
        raise ValueError("block_table (paged KV) and cache_leftpad are not supported by dlcore")
    names = ("q", "k_cache", "v_cache")
    _check_qkv(names, q, k_cache, v_cache, layout="(batch, seqlen, nheads, head_dim)", ndims=(4,))
    if k_cache.shape != v_cache.shape:
        raise ValueError(
            f"k_cache and v_cache must have the same shape, got {_shape(k_cache)} and "
            f"{_shape(v_cache)}"
        )
    b, lq, hq, d = q.shape
    lmax, hk = k_cache.shape[1], k_cache.shape[2]
    _check_heads(names, hq, hk, q, k_cache)
    if cache_batch_idx is not None:
        if not isinstance(cache_batch_idx, torch.Tensor) or _shape(cache_batch_idx) != (b,):
            raise ValueError(f"cache_batch_idx must be an int tensor of shape ({b},)")
        cache_batch_idx = cache_batch_idx.to(torch.int32)
        if int(cache_batch_idx.min()) < 0 or int(cache_batch_idx.max()) >= k_cache.shape[0]:
            raise ValueError(
                f"cache_batch_idx entries must index the {k_cache.shape[0]} cache rows, got "
                f"{cache_batch_idx.tolist()}"
            )
    elif k_cache.shape[0] != b:
        raise ValueError(
            f"k_cache has batch {k_cache.shape[0]} but q has {b} (pass cache_batch_idx to map "
            f"rows), shapes {_shape(k_cache)} and {_shape(q)}"
        )
    if cache_seqlens is None:
        seqlens = torch.full((b,), lmax, dtype=torch.int32, device=q.device)
    elif isinstance(cache_seqlens, int):
        seqlens = torch.full((b,), cache_seqlens, dtype=torch.int32, device=q.device)
    else:
        if _shape(cache_seqlens) != (b,):
            raise ValueError(
                f"cache_seqlens must be an int or shape ({b},), got {_shape(cache_seqlens)}"
            )
        seqlens = cache_seqlens.to(device=q.device, dtype=torch.int32)
    n_new = 0
    if (k is None) != (v is None):
        raise ValueError("pass both k and v (new keys and values) or neither")
    if k is not None:
        want = (b, None, hk, d)
        for name, t in (("k", k), ("v", v)):
            if t.dim() != 4 or any(w not in (None, s) for w, s in zip(want, t.shape, strict=True)):
                raise ValueError(
                    f"{name} must have shape ({b}, L_new, {hk}, {d}) like the cache rows, got "
                    f"{_shape(t)}"
                )
        if k.shape != v.shape:
            raise ValueError(f"k and v must have the same shape, got {_shape(k)}, {_shape(v)}")
        n_new = k.shape[1]
    if int(seqlens.min()) < 0 or int(seqlens.max()) + n_new > lmax:
        raise ValueError(
            f"cache_seqlens + {n_new} new keys must fit the cache length {lmax}, got "
            f"cache_seqlens {seqlens.tolist()}"
        )
    wl, wr = _check_window(window_size, causal)
    alibi = _alibi(alibi_slopes, b, hq, q)
    rows = (
        cache_batch_idx.long() if cache_batch_idx is not None else torch.arange(b, device=q.device)
    )
    if rotary_cos is not None:
        if rotary_sin is None or rotary_sin.shape != rotary_cos.shape or rotary_cos.dim() != 2:
            raise ValueError("rotary_cos and rotary_sin must both be given with shape (L, R/2)")
        if 2 * rotary_cos.shape[1] > d:
            raise ValueError(f"rotary dim {2 * rotary_cos.shape[1]} exceeds the head dim {d}")
        q_pos = seqlens.long()[:, None] + (
            torch.arange(lq, device=q.device) if (causal or wl >= 0) else 0
        )
        q = _rotate(q, rotary_cos[q_pos], rotary_sin[q_pos], rotary_interleaved)
        if k is not None:
            k_pos = seqlens.long()[:, None] + torch.arange(n_new, device=q.device)
            k = _rotate(k, rotary_cos[k_pos], rotary_sin[k_pos], rotary_interleaved)
    if k is not None:
        pos = seqlens.long()[:, None] + torch.arange(n_new, device=q.device)
        k_cache[rows[:, None], pos] = k.to(k_cache.dtype)
        v_cache[rows[:, None], pos] = v.to(v_cache.dtype)
    out, lse = attention_kvcache(
        last_dim_contiguous(q), k_cache, v_cache, seqlens + n_new, cache_batch_idx, alibi,
        _scale(softmax_scale, d), wl, wr, _check_softcap(softcap), int(num_splits),
    )  # fmt: skip
    return (out, lse) if return_softmax_lse else out


# ---------------------------------------------------------------------------------------------
# python -m dlcore check
# ---------------------------------------------------------------------------------------------


def _randn(gen: torch.Generator, dtype, device, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)


def _grads(fn, q, k, v, dout, **kwargs):
    """Outputs and dq, dk, dv of ``fn`` (dlcore call or reference) for parity checks."""
    qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(qq, kk, vv, **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    return (out.detach(), *torch.autograd.grad(out, (qq, kk, vv), dout.to(out.dtype)))


def parity_cases() -> list:
    from ..check import Case

    backends = implemented_backends()

    def sdpa_make(dtype, device, gen):
        q = _randn(gen, dtype, device, 2, 4, 17, 40)
        k, v = (_randn(gen, dtype, device, 2, 2, 23, 40) for _ in range(2))
        mask = (torch.rand(17, 23, generator=gen) > 0.3).to(device)
        return (q, k, v), {"attn_mask": mask, "enable_gqa": True}

    def flash_make(dtype, device, gen):
        q = _randn(gen, dtype, device, 1, 29, 4, 64)
        k, v = (_randn(gen, dtype, device, 1, 37, 1, 64) for _ in range(2))
        slopes = torch.rand(4, generator=gen).to(device)
        kw = {"causal": True, "softcap": 5.0, "alibi_slopes": slopes, "window_size": (20, -1)}
        return (q, k, v), kw

    def grad_make(dtype, device, gen):
        (q, k, v), kw = flash_make(dtype, device, gen)
        return (q, k, v, _randn(gen, dtype, device, *q.shape)), kw

    def varlen_make(dtype, device, gen):
        cu = torch.tensor([0, 9, 10, 40], dtype=torch.int32, device=device)
        q, k, v = (_randn(gen, dtype, device, 40, 2, 32) for _ in range(3))
        return (q, k, v, cu, cu), {"causal": True}

    def kvcache_make(dtype, device, gen):
        q = _randn(gen, dtype, device, 2, 1, 4, 64)
        kc, vc = (_randn(gen, dtype, device, 2, 70, 2, 64) for _ in range(2))
        lens = torch.tensor([70, 33], dtype=torch.int32, device=device)
        return (q, kc, vc, lens), {}

    def flash_out_lse(q, k, v, **kw):
        out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True, **kw)
        return out, lse

    def varlen_run(q, k, v, cu_q, cu_k, **kw):
        return flash_attn_varlen_func(q, k, v, cu_q, cu_k, 30, 30, **kw)

    def varlen_ref(q, k, v, cu_q, cu_k, **kw):
        return ref.flash_attn_varlen_reference(q, k, v, cu_q, cu_k, **kw)[0]

    def kvcache_run(q, kc, vc, lens):
        return flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, return_softmax_lse=True)

    return [
        Case(
            "scaled_dot_product_attention",
            "bool (Lq,Lk) mask, GQA, Lq!=Lk, D=40",
            sdpa_make,
            scaled_dot_product_attention,
            ref.sdpa_reference,
            backends,
        ),
        Case(
            "flash_attn_func",
            "causal bottom-right, window, ALiBi, softcap, MQA",
            flash_make,
            flash_out_lse,
            ref.flash_attn_reference,
            backends,
            outputs=("out", "lse"),
        ),
        Case(
            "flash_attn_func backward",
            "causal, window, ALiBi, softcap, MQA",
            grad_make,
            lambda q, k, v, do, **kw: _grads(flash_attn_func, q, k, v, do, **kw),
            lambda q, k, v, do, **kw: _grads(ref.flash_attn_reference, q, k, v, do, **kw),
            backends,
            outputs=("out", "dq", "dk", "dv"),
        ),
        Case(
            "flash_attn_varlen_func",
            "3 sequences (9, 1, 30), causal",
            varlen_make,
            varlen_run,
            varlen_ref,
            backends,
        ),
        Case(
            "flash_attn_with_kvcache",
            "decode Lq=1, cache lengths (70, 33), GQA",
            kvcache_make,
            kvcache_run,
            ref.flash_attn_kvcache_reference,
            backends,
            outputs=("out", "lse"),
        ),
    ]
