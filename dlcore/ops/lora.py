"""LoRA ops: ``dlcore.lora_linear`` (one adapter) and ``dlcore.lora_linear_multi`` (one adapter
per token), forward and backward, on the triton, cpu and eager backends.

Each computation is a ``torch.library`` custom op with a fake impl and autograd, so
``torch.compile(fullgraph=True)``, meta tensors and ``opcheck`` work. The forward op also returns
the rank-r intermediate ``xa = drop(x) @ A.T`` (tokens, r) in fp32, which backward needs for dB:
saving it costs tokens x r, recomputing it would cost another pass over x.

Backends: ``triton`` (kernels/lora.py: the low-rank update fused into the base GEMM); ``cpu``,
which writes the output once and allocates nothing larger than tokens x r besides the outputs:
up to 64 tokens (float32/64) the C++ ``lora_skinny_fwd_kernel`` computes the whole layer in one
streaming pass over the weight (BLAS would first pack it); beyond that the C++
``lora_multi_update_kernel`` writes bias + rank-r update into a fresh output (rows
counting-sorted by adapter for a mixed batch, no Python loop) and the BLAS base GEMM accumulates
onto it, so the output is written once by each. Backward of one adapter: the C++
``lora_factor_grads_kernel`` gives dy B, dA and dB in one pass over dy and x. Dropout works in
row chunks through BLAS; half types use BLAS calls throughout. ``eager``, the reference
written as peft computes it (dlcore/reference/lora.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .. import _ext
from ..backends import backend, forced_backend, triton_kernels
from ..reference import lora as ref
from .common import (
    FLOAT_DTYPES,
    check_tensor,
    dispatch,
    last_dim_contiguous,
    needs_registered_op,
    plain_eager,
    register_autograd,
)

_BACKENDS = ("triton", "cpu", "eager")
# Rows per dropout chunk on the composed path: keeps the masked-input temporary near 4 MB.
_CHUNK_ELEMS = 1 << 20


def _kernels():
    return triton_kernels("lora")


def _empty(t: torch.Tensor) -> torch.Tensor:
    return t.new_empty(0)


def _row_chunks(m: int, k: int):
    step = max(1, _CHUNK_ELEMS // max(k, 1))
    return ((s, min(s + step, m)) for s in range(0, m, step))


def _keep(x: torch.Tensor, start: int, stop: int, p: float, seed: int) -> torch.Tensor:
    """Keep mask of rows start..stop of x as x's dtype, scaled by 1 / (1 - p)."""
    keep = ref.dropout_keep_mask(seed, start, stop - start, x.shape[1], p, x.device)
    return keep.to(x.dtype) * (1.0 / (1.0 - p))


def _base_t(weight: torch.Tensor, fifo: bool) -> torch.Tensor:
    """The (in, out) operand of the base GEMM."""
    return weight if fifo else weight.t()


# ---- composed (cpu) backend ----------------------------------------------------------------


def _shrink_composed(x, lora_a, p, seed):
    """drop(x) @ A.T (tokens, r) in x's dtype."""
    if p <= 0:
        return torch.mm(x, lora_a.t())
    xa = x.new_empty(x.shape[0], lora_a.shape[0])
    for s, e in _row_chunks(x.shape[0], x.shape[1]):
        torch.mm(x[s:e] * _keep(x, s, e, p, seed), lora_a.t(), out=xa[s:e])
    return xa


def _has_cpu_kernel(name: str) -> bool:
    return _ext.CPU_EXT_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(
        f"dlcore::{name}", "CPU"
    )


# The C++ kernels (csrc/cpu/lora.cpp) take float32/float64; half types run the composed path.
_CPU_KERNELS = all(
    _has_cpu_kernel(name)
    for name in ("lora_skinny_fwd_kernel", "lora_multi_update_kernel", "lora_factor_grads_kernel")
)
_KERNEL_DTYPES = (torch.float32, torch.float64)
# lora_factor_grads_kernel keeps the rank in at most 4 vectors of 64 bytes.
_FACTOR_MAX_RANK = {torch.float32: 64, torch.float64: 32}
# Up to this many tokens the cpu backend runs the whole layer in lora_skinny_fwd_kernel (one
# streaming pass over the weight); BLAS wins beyond it, where packing the weight pays off.
_SKINNY_MAX_ROWS = 64


def _skinny(x, weight, fifo) -> bool:
    return (
        _CPU_KERNELS
        and 0 < x.shape[0] <= _SKINNY_MAX_ROWS
        and x.dtype in _KERNEL_DTYPES
        and not fifo
        and weight.stride(1) == 1
    )


def _fwd_skinny(x, weight, bias, a_stack, b_stack, scalings, indices):
    """out, xa from lora_skinny_fwd_kernel; stacks (n, r, in) / (n, out, r)."""
    x, a_stack = last_dim_contiguous(x), last_dim_contiguous(a_stack)
    out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype)
    xa = torch.empty(x.shape[0], a_stack.shape[1], dtype=torch.float32)
    torch.ops.dlcore.lora_skinny_fwd_kernel(
        x, weight, bias, a_stack, b_stack, scalings, indices, out, xa
    )
    return out, xa


def _update_first(x) -> bool:
    return _CPU_KERNELS and x.shape[0] > 0 and x.dtype in _KERNEL_DTYPES


def _fwd_update_first(x, weight, bias, a_stack, b_stack, scalings, indices, fifo):
    """out, xa: bias + rank-r update written into a fresh output by lora_multi_update_kernel,
    then the base GEMM accumulated onto it (beta = 1), as a biased nn.Linear's GEMM accumulates
    onto the broadcast bias: one pass over the output fewer than GEMM-then-update."""
    x = last_dim_contiguous(x)
    out = x.new_empty(x.shape[0], weight.shape[1] if fifo else weight.shape[0])
    xa = x.new_empty(x.shape[0], a_stack.shape[1], dtype=torch.float32)
    # B as (n, r, out) rows; LoRALinear's stacks are that layout already (a free view).
    b_t = last_dim_contiguous(b_stack.transpose(1, 2))
    bias = bias.contiguous() if bias is not None else None
    torch.ops.dlcore.lora_multi_update_kernel(
        x, last_dim_contiguous(a_stack), b_t, scalings, indices, out, xa, bias, True
    )
    return out.addmm_(x, _base_t(weight, fifo)), xa


def _fwd_cpu(x, weight, bias, lora_a, lora_b, scaling, p, seed, fifo):
    if p > 0 or not _update_first(x):  # dropout, half types, no kernels: BLAS composition
        return _fwd_composed(x, weight, bias, lora_a, lora_b, scaling, p, seed, fifo)
    scal = torch.tensor([scaling], dtype=torch.float64)
    if _skinny(x, weight, fifo):
        return _fwd_skinny(x, weight, bias, lora_a[None], lora_b[None], scal, None)
    return _fwd_update_first(x, weight, bias, lora_a[None], lora_b[None], scal, None, fifo)


def _fwd_composed(x, weight, bias, lora_a, lora_b, scaling, p, seed, fifo):
    w = _base_t(weight, fifo)
    out = torch.addmm(bias, x, w) if bias is not None else torch.mm(x, w)
    xa = _shrink_composed(x, lora_a, p, seed)
    out.addmm_(xa, lora_b.t(), alpha=scaling)
    return out, xa.float()


def _base_grads(dy, x, fifo, need_w, need_b):
    """(dW, dbias) of the base layer, empty where not needed."""
    dw = _empty(dy)
    if need_w:
        dw = torch.mm(x.t(), dy) if fifo else torch.mm(dy.t(), x)
    return dw, dy.sum(0) if need_b else _empty(dy)


def _factor_grads(dy, lora_b, p) -> bool:
    return (
        _CPU_KERNELS
        and p <= 0
        and dy.shape[0] > 0
        and dy.dtype in _KERNEL_DTYPES
        and lora_b.shape[1] <= _FACTOR_MAX_RANK[dy.dtype]
    )


def _bwd_cpu(dy, x, weight, lora_a, lora_b, xa, scaling, p, seed, fifo, needs):
    need_x, need_w, need_b, need_a, need_bl = needs
    if not ((need_a or need_bl) and _factor_grads(dy, lora_b, p)):
        return _bwd_composed(dy, x, weight, lora_a, lora_b, xa, scaling, p, seed, fifo, needs)
    dy, x = last_dim_contiguous(dy), last_dim_contiguous(x)
    r = lora_b.shape[1]
    g = dy.new_empty(dy.shape[0], r)
    da, dbl = dy.new_empty(r, x.shape[1]), dy.new_empty(dy.shape[1], r)
    torch.ops.dlcore.lora_factor_grads_kernel(dy, x, lora_b, xa.contiguous(), scaling, g, da, dbl)
    # The rank-r term first, then the base GEMM accumulates onto it.
    dx = torch.mm(g, lora_a).addmm_(dy, weight.t() if fifo else weight) if need_x else _empty(dy)
    dw, db = _base_grads(dy, x, fifo, need_w, need_b)
    return dx, dw, db, da if need_a else _empty(dy), dbl if need_bl else _empty(dy)


def _bwd_composed(dy, x, weight, lora_a, lora_b, xa, scaling, p, seed, fifo, needs):
    need_x, need_w, need_b, need_a, need_bl = needs
    dx, dw, db, da, dbl = (_empty(dy) for _ in range(5))
    # The scaling goes onto the (tokens, r) factors, never onto a full-size product.
    g = torch.mm(dy, lora_b).mul_(scaling) if (need_x or need_a) else None
    if need_x:
        dx = torch.mm(dy, weight.t() if fifo else weight)
        if p <= 0:
            dx.addmm_(g, lora_a)
        else:
            for s, e in _row_chunks(x.shape[0], x.shape[1]):
                dx[s:e].addcmul_(torch.mm(g[s:e], lora_a), _keep(x, s, e, p, seed))
    if need_a:
        if p <= 0:
            da = torch.mm(g.t(), x)
        else:
            da = torch.zeros_like(lora_a)
            for s, e in _row_chunks(x.shape[0], x.shape[1]):
                da.addmm_(g[s:e].t(), x[s:e] * _keep(x, s, e, p, seed))
    if need_bl:
        # (xa^T dy)^T: BLAS streams dy row-major this way, ~1.6x faster than dy^T xa.
        dbl = torch.mm((xa.to(dy.dtype) * scaling).t(), dy).t().contiguous()
    dw, db = _base_grads(dy, x, fifo, need_w, need_b)
    return dx, dw, db, da, dbl


def _groups(indices: torch.Tensor, n: int) -> list[tuple[int, torch.Tensor]]:
    """(adapter, rows) for every adapter that has rows: one sort, no loop over tokens."""
    idx = indices.to(torch.int64)
    perm = torch.argsort(idx, stable=True)
    counts = torch.bincount(idx + 1, minlength=n + 1).tolist()
    groups, start = [], counts[0]
    for a in range(n):
        if counts[a + 1]:
            groups.append((a, perm[start : start + counts[a + 1]]))
        start += counts[a + 1]
    return groups


# Up to this many tokens the composed multi-adapter path multiplies every row by all adapters
# (a few BLAS calls on (tokens, n * r) intermediates) instead of one group of calls per adapter.
_DENSE_MULTI_MAX_ROWS = 16


def _multi_lora_dense(x, out, a_stack, b_stack, scalings, indices, save_xa):
    """out += per-row scaled low-rank update for every adapter at once; the weights of the other
    adapters are masked out. (n * r, in) / (n * r, out) views when the stacks are laid out
    (n, r, features), as LoRALinear builds them; copies otherwise."""
    n, r = a_stack.shape[0], a_stack.shape[1]
    m = x.shape[0]
    xa_all = torch.mm(x, a_stack.reshape(n * r, -1).t()).view(m, n, r)
    idx = indices.to(torch.int64)
    sel = torch.nn.functional.one_hot(idx + 1, n + 1)[:, 1:].to(x.dtype) * scalings.to(x.dtype)
    b_flat = b_stack.transpose(1, 2).reshape(n * r, -1)
    out.addmm_((xa_all * sel[:, :, None]).view(m, n * r), b_flat)
    if not save_xa:
        return x.new_empty(0, r, dtype=torch.float32)
    rows = torch.arange(m, device=x.device)
    return (xa_all[rows, idx.clamp(min=0)] * (idx >= 0)[:, None]).float()


def _multi_fwd_cpu(x, weight, bias, a_stack, b_stack, scalings, indices, fifo, save_xa):
    if _skinny(x, weight, fifo):
        out, xa = _fwd_skinny(x, weight, bias, a_stack, b_stack, scalings, indices)
    elif _update_first(x):
        out, xa = _fwd_update_first(x, weight, bias, a_stack, b_stack, scalings, indices, fifo)
    else:
        return _multi_fwd_composed(
            x, weight, bias, a_stack, b_stack, scalings, indices, fifo, save_xa
        )
    return out, xa if save_xa else xa.new_empty(0, xa.shape[1])


def _multi_fwd_composed(x, weight, bias, a_stack, b_stack, scalings, indices, fifo, save_xa):
    w = _base_t(weight, fifo)
    out = torch.addmm(bias, x, w) if bias is not None else torch.mm(x, w)
    if x.shape[0] <= _DENSE_MULTI_MAX_ROWS:
        return out, _multi_lora_dense(x, out, a_stack, b_stack, scalings, indices, save_xa)
    xa = x.new_zeros(x.shape[0] if save_xa else 0, a_stack.shape[1], dtype=torch.float32)
    scales = scalings.tolist()
    for a, rows in _groups(indices, a_stack.shape[0]):
        xa_a = torch.mm(x.index_select(0, rows), a_stack[a].t())
        out.index_add_(0, rows, torch.mm(xa_a, b_stack[a].t()), alpha=scales[a])
        if save_xa:
            xa.index_copy_(0, rows, xa_a.float())
    return out, xa


def _multi_bwd_composed(dy, x, weight, a_stack, b_stack, scalings, indices, xa, fifo, needs):
    need_x, need_w, need_b, need_a, need_bl = needs
    dx, dw, db, da, dbl = (_empty(dy) for _ in range(5))
    if need_x:
        dx = torch.mm(dy, weight.t() if fifo else weight)
    if need_a:
        da = torch.zeros_like(a_stack)
    if need_bl:
        dbl = torch.zeros_like(b_stack)
    scales = scalings.tolist()
    if need_x or need_a or need_bl:
        for a, rows in _groups(indices, a_stack.shape[0]):
            dy_a = dy.index_select(0, rows)
            if need_x or need_a:
                g = torch.mm(dy_a, b_stack[a])
            if need_x:
                dx.index_add_(0, rows, torch.mm(g, a_stack[a]), alpha=scales[a])
            if need_a:
                torch.mm(g.t(), x.index_select(0, rows), out=da[a]).mul_(scales[a])
            if need_bl:
                xa_a = xa.index_select(0, rows).to(dy.dtype)
                torch.mm(dy_a.t(), xa_a, out=dbl[a]).mul_(scales[a])
    dw, db = _base_grads(dy, x, fifo, need_w, need_b)
    return dx, dw, db, da, dbl


# ---- eager backend: the reference, with its backward written out from the same formulas ----


def _fwd_eager(x, weight, bias, lora_a, lora_b, scaling, p, seed, fifo):
    out = ref.lora_linear_reference(x, weight, bias, lora_a, lora_b, scaling, p, seed, fifo)
    xa = torch.nn.functional.linear(ref.lora_dropout(x, p, seed), lora_a)
    return out, xa.float()


def _bwd_eager(dy, x, weight, lora_a, lora_b, xa, scaling, p, seed, fifo, needs):
    need_x, need_w, need_b, need_a, need_bl = needs
    xd = ref.lora_dropout(x, p, seed)
    g = dy @ lora_b
    dx = dy @ (weight.t() if fifo else weight)
    if p > 0:
        mask = ref.lora_dropout(torch.ones_like(x), p, seed)
        dx = dx + mask * ((g @ lora_a) * scaling)
    else:
        dx = dx + (g @ lora_a) * scaling
    grads = (
        dx,
        x.t() @ dy if fifo else dy.t() @ x,
        dy.sum(0),
        (g.t() @ xd) * scaling,
        (dy.t() @ (xd @ lora_a.t())) * scaling,
    )
    return tuple(gr if need else _empty(dy) for gr, need in zip(grads, needs, strict=True))


def _multi_fwd_eager(x, weight, bias, a_stack, b_stack, scalings, indices, fifo, save_xa):
    out = ref.lora_linear_multi_reference(
        x, weight, bias, a_stack, b_stack, scalings, indices, fifo
    )
    if not save_xa:
        return out, x.new_empty(0, a_stack.shape[1], dtype=torch.float32)
    idx = indices.to(torch.int64)
    xa = torch.einsum("mk,mrk->mr", x, a_stack[idx.clamp(min=0)]) * (idx >= 0)[:, None]
    return out, xa.float()


def _multi_bwd_eager(dy, x, weight, a_stack, b_stack, scalings, indices, xa, fifo, needs):
    idx = indices.to(torch.int64)
    sel = (idx >= 0).to(dy.dtype)[:, None] * scalings.to(dy.dtype)[idx.clamp(min=0)][:, None]
    a_rows, b_rows = a_stack[idx.clamp(min=0)], b_stack[idx.clamp(min=0)]
    g = torch.einsum("mn,mnr->mr", dy, b_rows) * sel
    onehot = torch.nn.functional.one_hot(idx + 1, a_stack.shape[0] + 1)[:, 1:].to(dy.dtype)
    grads = (
        dy @ (weight.t() if fifo else weight) + torch.einsum("mr,mrk->mk", g, a_rows),
        x.t() @ dy if fifo else dy.t() @ x,
        dy.sum(0),
        torch.einsum("ma,mr,mk->ark", onehot, g, x),
        torch.einsum("ma,mn,mr->anr", onehot * sel, dy, xa.to(dy.dtype)),
    )
    return tuple(gr if need else _empty(dy) for gr, need in zip(grads, needs, strict=True))


# ---- triton backend --------------------------------------------------------------------------
# The kernels take fp16/bf16/fp32; float64 (gradcheck, references) and empty batches run the
# composed BLAS path on the same device.


def _grads_like(dy, x, weight, lora_a, lora_b, needs):
    shapes = (x, weight, dy[0], lora_a, lora_b)
    return [
        torch.empty_like(t, memory_format=torch.contiguous_format) if need else _empty(dy)
        for t, need in zip(shapes, needs, strict=True)
    ]


def _fwd_triton(x, weight, bias, lora_a, lora_b, scaling, p, seed, fifo):
    if x.shape[0] == 0 or x.dtype == torch.float64:
        return _fwd_composed(x, weight, bias, lora_a, lora_b, scaling, p, seed, fifo)
    out = x.new_empty(x.shape[0], weight.shape[1] if fifo else weight.shape[0])
    xa = x.new_empty(x.shape[0], lora_a.shape[0], dtype=torch.float32)
    _kernels().lora_forward(x, weight, bias, lora_a, lora_b, scaling, p, seed, fifo, out, xa)
    return out, xa


def _bwd_triton(dy, x, weight, lora_a, lora_b, xa, scaling, p, seed, fifo, needs):
    if dy.shape[0] == 0 or dy.dtype == torch.float64:
        return _bwd_composed(dy, x, weight, lora_a, lora_b, xa, scaling, p, seed, fifo, needs)
    grads = _grads_like(dy, x, weight, lora_a, lora_b, needs)
    _kernels().lora_backward(
        dy, x, weight, lora_a, lora_b, xa, scaling, p, seed, fifo, needs, grads
    )
    return tuple(grads)


def _multi_fwd_triton(x, weight, bias, a_stack, b_stack, scalings, indices, fifo, save_xa):
    if x.shape[0] == 0 or x.dtype == torch.float64:
        return _multi_fwd_composed(
            x, weight, bias, a_stack, b_stack, scalings, indices, fifo, save_xa
        )
    out = x.new_empty(x.shape[0], weight.shape[1] if fifo else weight.shape[0])
    xa = x.new_empty(x.shape[0], a_stack.shape[1], dtype=torch.float32)
    _kernels().lora_multi_forward(
        x, weight, bias, a_stack, b_stack, scalings, indices, fifo, out, xa
    )
    return out, xa if save_xa else xa.new_empty(0, xa.shape[1])


def _multi_bwd_triton(dy, x, weight, a_stack, b_stack, scalings, indices, xa, fifo, needs):
    if dy.shape[0] == 0 or dy.dtype == torch.float64:
        return _multi_bwd_composed(
            dy, x, weight, a_stack, b_stack, scalings, indices, xa, fifo, needs
        )
    grads = _grads_like(dy, x, weight, a_stack, b_stack, needs)
    _kernels().lora_multi_backward(
        dy, x, weight, a_stack, b_stack, scalings, indices, xa, fifo, needs, grads
    )
    return tuple(grads)


# ---- registered ops --------------------------------------------------------------------------

Grads = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@torch.library.custom_op("dlcore::lora_linear", mutates_args=())
def _lora_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: int,
    fan_in_fan_out: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _lora_linear_body(
        x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, fan_in_fan_out
    )


def _lora_linear_body(x, weight, bias, lora_A, lora_B, scaling, p, seed, fifo):
    impls = {"triton": _fwd_triton, "cpu": _fwd_cpu, "eager": _fwd_eager}
    return dispatch("lora_linear", impls, x.device, x, weight, bias, lora_A, lora_B, scaling, p,
                    seed, fifo)  # fmt: skip


@_lora_linear_op.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, fan_in_fan_out):
    n = weight.shape[1] if fan_in_fan_out else weight.shape[0]
    return x.new_empty(x.shape[0], n), x.new_empty(x.shape[0], lora_A.shape[0], dtype=torch.float32)


@torch.library.custom_op("dlcore::lora_linear_backward", mutates_args=())
def _lora_linear_backward_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    xa: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: int,
    fan_in_fan_out: bool,
    needs: list[bool],
) -> Grads:
    return _lora_linear_backward_body(
        dy, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, fan_in_fan_out, needs
    )


def _lora_linear_backward_body(dy, x, weight, lora_A, lora_B, xa, scaling, p, seed, fifo, needs):
    impls = {"triton": _bwd_triton, "cpu": _bwd_cpu, "eager": _bwd_eager}
    args = (dy, x, weight, lora_A, lora_B, xa, scaling, p, seed, fifo)
    return dispatch("lora_linear_backward", impls, dy.device, *args, tuple(needs))


def _fake_grads(dy, x, weight, lora_a, lora_b, needs):
    shapes = (x, weight, dy[0], lora_a, lora_b)
    return tuple(
        t.new_empty(t.shape) if need else dy.new_empty(0)
        for t, need in zip(shapes, needs, strict=True)
    )


# Fake impls of the C++ kernel ops (schemas in csrc/dlcore.cpp), for opcheck and tracing.
if _CPU_KERNELS:

    @torch.library.register_fake("dlcore::lora_skinny_fwd_kernel")
    def _(x, weight, bias, lora_A, lora_B, scalings, indices, out, xa):
        return None

    @torch.library.register_fake("dlcore::lora_multi_update_kernel")
    def _(x, lora_A, lora_B_t, scalings, indices, out, xa, bias=None, overwrite=False):
        return None

    @torch.library.register_fake("dlcore::lora_factor_grads_kernel")
    def _(dy, x, lora_B, xa, scaling, g, dA, dB):
        return None


@_lora_linear_backward_op.register_fake
def _(dy, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, fan_in_fan_out, needs):
    return _fake_grads(dy, x, weight, lora_A, lora_B, needs)


def _setup_single(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scaling, p, seed, fifo = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, output[1])
    # xa is an output only so that backward can reuse it for dB; it has no gradient.
    ctx.mark_non_differentiable(output[1])
    ctx.args = (scaling, p, seed, fifo)


def _backward_single(ctx, dout, dxa):
    x, weight, lora_a, lora_b, xa = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:5])
    if not any(needs):
        return (None,) * 9
    # Outside torch.compile and double backward, the body runs without the op wrapper.
    run = (
        _lora_linear_backward_op
        if needs_registered_op((dout, x, weight, lora_a, lora_b, xa))
        else _lora_linear_backward_body
    )
    grads = run(dout, x, weight, lora_a, lora_b, xa, *ctx.args, needs)
    return (*(g if need else None for g, need in zip(grads, needs, strict=True)),) + (None,) * 4


register_autograd(_lora_linear_op, _backward_single, setup_context=_setup_single)


class _LoraLinearFunction(torch.autograd.Function):
    """The registered op's forward and backward for plain eager calls: the op's autograd
    wrapper costs ~40 us per call (argument defaults filled per call), as much as a small
    layer's LoRA work; torch.compile and tensor subclasses still go through the op."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, p, seed, fifo):
        out, xa = _lora_linear_body(x, weight, bias, lora_a, lora_b, scaling, p, seed, fifo)
        ctx.dlcore_forced_backend = forced_backend()
        _setup_single(ctx, (x, weight, bias, lora_a, lora_b, scaling, p, seed, fifo), (out, xa))
        return out, xa

    @staticmethod
    def backward(ctx, dout, dxa):
        with backend(ctx.dlcore_forced_backend):
            return _backward_single(ctx, dout, dxa)


@torch.library.custom_op("dlcore::lora_linear_multi", mutates_args=())
def _lora_linear_multi_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scalings: torch.Tensor,
    indices: torch.Tensor,
    fan_in_fan_out: bool,
    save_xa: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    impls = {"triton": _multi_fwd_triton, "cpu": _multi_fwd_cpu, "eager": _multi_fwd_eager}
    args = (x, weight, bias, lora_A, lora_B, scalings, indices, fan_in_fan_out, save_xa)
    return dispatch("lora_linear_multi", impls, x.device, *args)


@_lora_linear_multi_op.register_fake
def _(x, weight, bias, lora_A, lora_B, scalings, indices, fan_in_fan_out, save_xa):
    n = weight.shape[1] if fan_in_fan_out else weight.shape[0]
    rows = x.shape[0] if save_xa else 0
    return x.new_empty(x.shape[0], n), x.new_empty(rows, lora_A.shape[1], dtype=torch.float32)


@torch.library.custom_op("dlcore::lora_linear_multi_backward", mutates_args=())
def _lora_linear_multi_backward_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scalings: torch.Tensor,
    indices: torch.Tensor,
    xa: torch.Tensor,
    fan_in_fan_out: bool,
    needs: list[bool],
) -> Grads:
    impls = {"triton": _multi_bwd_triton, "cpu": _multi_bwd_composed, "eager": _multi_bwd_eager}
    args = (dy, x, weight, lora_A, lora_B, scalings, indices, xa, fan_in_fan_out)
    return dispatch("lora_linear_multi_backward", impls, dy.device, *args, tuple(needs))


@_lora_linear_multi_backward_op.register_fake
def _(dy, x, weight, lora_A, lora_B, scalings, indices, xa, fan_in_fan_out, needs):
    return _fake_grads(dy, x, weight, lora_A, lora_B, needs)


def _setup_multi(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scalings, indices, fifo, _ = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, scalings, indices, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.fifo = fifo


def _backward_multi(ctx, dout, dxa):
    x, weight, lora_a, lora_b, scalings, indices, xa = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:5])
    if not any(needs):
        return (None,) * 9
    grads = _lora_linear_multi_backward_op(
        dout, x, weight, lora_a, lora_b, scalings, indices, xa, ctx.fifo, needs
    )
    return (*(g if need else None for g, need in zip(grads, needs, strict=True)),) + (None,) * 4


register_autograd(_lora_linear_multi_op, _backward_multi, setup_context=_setup_multi)


# ---- public functions ------------------------------------------------------------------------


def _check_linear(x, weight, bias, fan_in_fan_out):
    """Validate x and the base layer; return (in_features, out_features)."""
    check_tensor("x", x, dtypes=(*FLOAT_DTYPES, torch.float64), layout="(..., in_features)")
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension (..., in_features), got a scalar")
    dev, dt = x.device, x.dtype
    wl = "(in_features, out_features) with fan_in_fan_out" if fan_in_fan_out else ""
    check_tensor("weight", weight, ndim=2, layout=wl or "(out_features, in_features)")
    in_f = weight.shape[0] if fan_in_fan_out else weight.shape[1]
    out_f = weight.shape[1] if fan_in_fan_out else weight.shape[0]
    if x.shape[-1] != in_f:
        raise ValueError(
            f"x has {x.shape[-1]} features in its last dimension but weight "
            f"{tuple(weight.shape)} takes in_features={in_f}"
            + (" (fan_in_fan_out: weight is (in, out))" if fan_in_fan_out else "")
        )
    check_tensor("weight", weight, dtypes=(dt,), device=dev)
    if bias is not None:
        check_tensor("bias", bias, shape=(out_f,), dtypes=(dt,), device=dev, layout="(out,)")
    return in_f, out_f


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
    fan_in_fan_out: bool = False,
    seed: int | None = None,
) -> torch.Tensor:
    """``x @ W.T + bias + scaling * (dropout(x) @ lora_A.T) @ lora_B.T`` in one pass.

    Shapes as peft stores them: x (..., in), weight (out, in) (or (in, out) with
    ``fan_in_fan_out``), lora_A (r, in), lora_B (out, r). Dropout (when ``training`` and
    ``dropout_p > 0``) is counter-based: ``seed`` (drawn from torch's generator when None) fixes
    the mask, and backward regenerates it. Differentiable in x, weight, bias, lora_A, lora_B.
    """
    in_f, out_f = _check_linear(x, weight, bias, fan_in_fan_out)
    check_tensor("lora_A", lora_A, ndim=2, layout="(r, in_features)")
    r = lora_A.shape[0]
    if r < 1:
        raise ValueError(f"lora_A must have rank r >= 1 rows (r, in_features), got {lora_A.shape}")
    check_tensor("lora_A", lora_A, shape=(r, in_f), layout="(r, in_features)")
    check_tensor("lora_B", lora_B, ndim=2, layout="(out_features, r)")
    if lora_B.shape[1] != r:
        raise ValueError(
            f"rank mismatch: lora_A {tuple(lora_A.shape)} has rank {r} but lora_B "
            f"{tuple(lora_B.shape)} has rank {lora_B.shape[1]}; expected lora_B ({out_f}, {r})"
        )
    check_tensor("lora_B", lora_B, shape=(out_f, r), layout="(out_features, r)")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        check_tensor(name, t, dtypes=(x.dtype,), device=x.device)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    p = float(dropout_p) if training else 0.0
    if p > 0 and seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    run = (
        _LoraLinearFunction.apply
        if plain_eager((x, weight, bias, lora_A, lora_B))
        else _lora_linear_op
    )
    out, _ = run(
        x.reshape(-1, in_f), weight, bias, lora_A, lora_B, float(scaling), p, int(seed or 0),
        bool(fan_in_fan_out),
    )  # fmt: skip
    return out.reshape(*x.shape[:-1], out_f)


def lora_linear_multi(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A_stack: torch.Tensor,
    lora_B_stack: torch.Tensor,
    scalings: torch.Tensor | Sequence[float],
    adapter_indices: torch.Tensor,
    fan_in_fan_out: bool = False,
    *,
    check_indices: bool = True,
) -> torch.Tensor:
    """A batch where every token uses its own adapter (punica/vLLM style multi-LoRA).

    ``lora_A_stack`` (n, r_max, in) and ``lora_B_stack`` (n, out, r_max) hold n adapters
    zero-padded to the largest rank; ``scalings`` (n,); ``adapter_indices`` (x.shape[:-1] or
    tokens) picks each token's adapter, -1 = base layer only, in any order. Differentiable in x,
    weight, bias and the stacks. ``check_indices=False`` skips the range check of the index
    values (a host sync on GPU) for callers whose indices are valid by construction.
    """
    in_f, out_f = _check_linear(x, weight, bias, fan_in_fan_out)
    check_tensor("lora_A_stack", lora_A_stack, ndim=3, layout="(n_adapters, r_max, in_features)")
    n, r = lora_A_stack.shape[0], lora_A_stack.shape[1]
    if n < 1 or r < 1:
        raise ValueError(
            f"lora_A_stack must hold n >= 1 adapters of rank >= 1 (n_adapters, r_max, "
            f"in_features), got {tuple(lora_A_stack.shape)}"
        )
    check_tensor("lora_A_stack", lora_A_stack, shape=(n, r, in_f), layout="(n, r_max, in)")
    check_tensor("lora_B_stack", lora_B_stack, ndim=3, layout="(n_adapters, out_features, r_max)")
    if lora_B_stack.shape[2] != r:
        raise ValueError(
            f"rank mismatch: lora_A_stack {tuple(lora_A_stack.shape)} has r_max {r} but "
            f"lora_B_stack {tuple(lora_B_stack.shape)} has {lora_B_stack.shape[2]}; expected "
            f"lora_B_stack ({n}, {out_f}, {r})"
        )
    check_tensor("lora_B_stack", lora_B_stack, shape=(n, out_f, r), layout="(n, out, r_max)")
    for name, t in (("lora_A_stack", lora_A_stack), ("lora_B_stack", lora_B_stack)):
        check_tensor(name, t, dtypes=(x.dtype,), device=x.device)
    scal = torch.as_tensor(scalings, dtype=torch.float32, device=x.device).reshape(-1)
    if scal.numel() != n:
        raise ValueError(f"scalings must have one value per adapter ({n}), got {scal.numel()}")
    if not isinstance(adapter_indices, torch.Tensor):
        adapter_indices = torch.as_tensor(adapter_indices, device=x.device)
    tokens = math.prod(x.shape[:-1])
    if adapter_indices.is_floating_point() or adapter_indices.dtype == torch.bool:
        raise ValueError(f"adapter_indices must be an integer tensor, got {adapter_indices.dtype}")
    if adapter_indices.numel() != tokens:
        raise ValueError(
            f"adapter_indices must have one entry per token: shape {tuple(x.shape[:-1])} "
            f"({tokens} tokens), got {tuple(adapter_indices.shape)}"
        )
    idx = adapter_indices.to(device=x.device, dtype=torch.int32).reshape(-1).contiguous()
    if check_indices and idx.numel() and not torch.compiler.is_compiling():
        lo, hi = int(idx.min()), int(idx.max())
        if lo < -1 or hi >= n:
            raise ValueError(
                f"adapter_indices out of range: got values in [{lo}, {hi}], expected -1 (base "
                f"only) or 0..{n - 1} for {n} adapters"
            )
    # The (tokens, r) intermediate is kept only when backward will need it for dB.
    save_xa = torch.is_grad_enabled() and lora_B_stack.requires_grad
    out, _ = _lora_linear_multi_op(
        x.reshape(-1, in_f), weight, bias, lora_A_stack, lora_B_stack, scal, idx,
        bool(fan_in_fan_out), save_xa,
    )  # fmt: skip
    return out.reshape(*x.shape[:-1], out_f)


# ---- python -m dlcore check ------------------------------------------------------------------


def _make_single(in_f, out_f, r, lead, bias, p, fifo):
    def make(dtype, device, gen):
        def rnd(*shape, scale=1.0):
            return (torch.randn(*shape, generator=gen) * scale).to(dtype=dtype, device=device)

        x = rnd(*lead, in_f)
        w = rnd(in_f, out_f, scale=in_f**-0.5) if fifo else rnd(out_f, in_f, scale=in_f**-0.5)
        b = rnd(out_f) if bias else None
        a, bl = rnd(r, in_f, scale=in_f**-0.5), rnd(out_f, r, scale=r**-0.5)
        kw = {"dropout_p": p, "training": p > 0, "fan_in_fan_out": fifo, "seed": 7}
        return (x, w, b, a, bl, 2.0), kw

    return make


def _ref_single(x, w, b, a, bl, scaling, dropout_p, training, fan_in_fan_out, seed):
    p = dropout_p if training else 0.0
    return ref.lora_linear_reference(x, w, b, a, bl, scaling, p, seed, fan_in_fan_out)


def _with_grads(fn):
    """(out, d x, d weight, d bias, d A, d B) of fn for a fixed output gradient."""

    def run(x, w, b, a, bl, *args, **kw):
        leaves = [t.detach().requires_grad_() for t in (x, w, b, a, bl)]
        out = fn(*leaves, *args, **kw)
        dy = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device)
        grads = torch.autograd.grad(out, leaves, dy.reshape(out.shape))
        return (out.detach(), *grads)

    return run


def _make_multi(in_f, out_f, r, lead, n):
    def make(dtype, device, gen):
        def rnd(*shape, scale=1.0):
            return (torch.randn(*shape, generator=gen) * scale).to(dtype=dtype, device=device)

        x = rnd(*lead, in_f)
        a, bl = rnd(n, r, in_f, scale=in_f**-0.5), rnd(n, out_f, r, scale=r**-0.5)
        idx = torch.randint(-1, n, lead, generator=gen).to(device)
        scal = torch.linspace(0.5, 2.0, n, device=device)
        return (x, rnd(out_f, in_f, scale=in_f**-0.5), rnd(out_f), a, bl, scal, idx), {}

    return make


def _ref_multi(x, w, b, a, bl, scal, idx):
    return ref.lora_linear_multi_reference(x, w, b, a, bl, scal, idx)


def parity_cases():
    from ..check import Case

    grads = ("out", "dx", "dweight", "dbias", "dlora_A", "dlora_B")
    return [
        Case("lora_linear", "x(2,9,45) 45->70 r8 bias", _make_single(45, 70, 8, (2, 9), True, 0.0,
             False), lora_linear, _ref_single, _BACKENDS),
        Case("lora_linear", "x(13,45) 45->70 r100 dropout0.25 fan_in_fan_out",
             _make_single(45, 70, 100, (13,), True, 0.25, True), lora_linear, _ref_single,
             _BACKENDS),
        Case("lora_linear+grad", "x(3,7,45) 45->70 r16 dropout0.1",
             _make_single(45, 70, 16, (3, 7), True, 0.1, False), _with_grads(lora_linear),
             _with_grads(_ref_single), _BACKENDS, outputs=grads),
        Case("lora_linear_multi", "x(37,45) 45->70 4 adapters r16 (-1 rows)",
             _make_multi(45, 70, 16, (37,), 4), lora_linear_multi, _ref_multi, _BACKENDS),
        Case("lora_linear_multi+grad", "x(2,5,45) 45->70 3 adapters r8",
             _make_multi(45, 70, 8, (2, 5), 3), _with_grads(lora_linear_multi),
             _with_grads(_ref_multi), _BACKENDS, outputs=grads),
    ]  # fmt: skip
