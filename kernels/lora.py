"""Triton LoRA kernels: the base GEMM with the low-rank update fused into it, forward and backward,
single adapter and many adapters per batch.

``lora_fused_mm_kernel`` computes ``out = X @ W (+ bias) + scale * (drop(X) @ P) @ Q`` for any
operand strides, so one kernel serves the forward (X = x, W = weight.T, P = A.T, Q = B.T) and the
input gradient (X = dy, W = weight, P = B, Q = A, dropout mask applied to the low-rank term of
the output instead of to the input). The rank-r intermediate ``T = drop(X) @ P`` is accumulated
in the same K loop as the base GEMM, from the same X tile, and stays in registers
(``R_PAD <= 64``); for larger ranks it comes from a (tokens, r) fp32 buffer written by
``lora_shrink_kernel``. Bias and ``scale * T @ Q`` are added in the epilogue, so the output is
written once.

Multi-adapter batches (one adapter per row, -1 = none): MODE_SEGMENTED (SGMV) takes rows sorted
by adapter through a permutation and a tile map in which every BM-row tile has one adapter, so
the low-rank products stay tensor-core dots; MODE_GATHER (BGMV, for few tokens) runs the base
GEMM over all rows once and adds each row's own ``T[m] @ Q[a_m]`` in the epilogue with gathered
loads. ``lora_matmul_tn_kernel`` computes the weight gradients ``scale * L.T @ R`` over (a
subset of) rows.

Dropout: element (i, k) of the (tokens, in) input is kept iff ``tl.randint(seed, i * in + k)
>> 8 >= threshold``, regenerated wherever it is needed (see dlcore/reference/lora.py).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from dlcore.reference.lora import dropout_threshold

from .aot import Spec, max_registers

MODE_SINGLE, MODE_SEGMENTED, MODE_GATHER = 0, 1, 2
# Larger ranks use the fp32 (tokens, r) buffer, so registers stay spill-free; the segmented
# kernel carries the tile map and row permutation too, so its limit is lower.
R_IN_LOOP_MAX = 64
R_IN_LOOP_MAX_SEGMENTED = 32
BK = 32
R_CHUNK = 64  # rank chunk of the epilogue when T comes from the buffer


# Triton's CPU interpreter computes bf16 tl.dot wrongly (garbage of order 1e10, triton 3.9);
# there the bf16 operands go through fp32, which holds their products exactly.
_INTERPRET_BF16_DOT_FIX = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))


@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr):
    if _INTERPRET_BF16_DOT_FIX and a.dtype == tl.bfloat16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _keep(seed, rows, cols, ld, drop_thr):
    offs = rows.to(tl.int64)[:, None] * ld + cols[None, :]
    return (tl.randint(seed, offs) >> 8).to(tl.int32) >= drop_thr


@triton.jit
def lora_fused_mm_kernel(
    x_ptr, w_ptr, bias_ptr, p_ptr, q_ptr, t_ptr, out_ptr, save_ptr,
    scal_ptr, idx_ptr, perm_ptr, tile_ptr,
    M, N, K, R,
    sxm, sxk, swk, swn, spa, spk, spr, sqa, sqr, sqn, som, son,
    scaling, inv_keep, seed, drop_thr,
    has_bias, drop_in, drop_out, save_t,
    MODE: tl.constexpr, T_IN_LOOP: tl.constexpr, R_PAD: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, R_CHUNK: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    dtype = x_ptr.dtype.element_ty
    offs_i = tl.arange(0, BM)
    adapter = 0
    scale = scaling
    valid = True
    if MODE == 1:
        # Tile map row: (first sorted row, row count, adapter); tiles past the end have 0 rows.
        start = tl.load(tile_ptr + pid_m * 3)
        count = tl.load(tile_ptr + pid_m * 3 + 1)
        adapter = tl.load(tile_ptr + pid_m * 3 + 2)
        if count == 0:
            return
        row_ok = offs_i < count
        rows = tl.load(perm_ptr + start + offs_i, mask=row_ok, other=0)
        valid = adapter >= 0
        adapter = tl.maximum(adapter, 0)
        scale = tl.where(valid, tl.load(scal_ptr + adapter), 0.0)
    else:
        rows = pid_m * BM + offs_i
        row_ok = rows < M
    rows64 = rows.to(tl.int64)
    cols = pid_n * BN + tl.arange(0, BN)
    col_ok = cols < N
    offs_r = tl.arange(0, R_PAD)
    r_ok = offs_r < R
    p_base = p_ptr + adapter * spa
    q_base = q_ptr + adapter * sqa

    acc = tl.zeros((BM, BN), dtype=tl.float32)
    t = tl.zeros((BM, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        k_ok = ks < K
        x = tl.load(
            x_ptr + rows64[:, None] * sxm + ks[None, :] * sxk,
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        w = tl.load(
            w_ptr + ks[:, None] * swk + cols[None, :] * swn,
            mask=k_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        acc = _dot(x, w, acc, PREC)
        if T_IN_LOOP:
            p = tl.load(
                p_base + ks[:, None] * spk + offs_r[None, :] * spr,
                mask=k_ok[:, None] & r_ok[None, :],
                other=0.0,
            )
            if drop_in:
                keep = _keep(seed, rows, ks, K, drop_thr)
                x = tl.where(keep, x.to(tl.float32) * inv_keep, 0.0).to(dtype)
            t = _dot(x, p, t, PREC)

    lora = tl.zeros((BM, BN), dtype=tl.float32)
    if MODE == 2:
        # BGMV: each row its own adapter; T from the buffer, rank-one updates with gathered Q.
        a_row = tl.load(idx_ptr + rows, mask=row_ok, other=-1)
        s_row = tl.where(a_row >= 0, tl.load(scal_ptr + tl.maximum(a_row, 0), mask=row_ok), 0.0)
        q_rows = q_ptr + tl.maximum(a_row, 0).to(tl.int64)[:, None] * sqa + cols[None, :] * sqn
        qmask = row_ok[:, None] & col_ok[None, :]
        for r in range(0, R):
            t_r = tl.load(t_ptr + rows64 * R + r, mask=row_ok, other=0.0) * s_row
            q_r = tl.load(q_rows + r * sqr, mask=qmask, other=0.0).to(tl.float32)
            lora += t_r[:, None] * q_r
    elif T_IN_LOOP:
        if save_t:
            if pid_n == 0:
                tl.store(
                    save_ptr + rows64[:, None] * R + offs_r[None, :],
                    tl.where(valid, t, 0.0),
                    mask=row_ok[:, None] & r_ok[None, :],
                )
        q = tl.load(
            q_base + offs_r[:, None] * sqr + cols[None, :] * sqn,
            mask=r_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        lora = _dot((t * scale).to(dtype), q, lora, PREC)
    else:
        for r0 in range(0, R, R_CHUNK):
            rs = r0 + tl.arange(0, R_CHUNK)
            rs_ok = rs < R
            tc = tl.load(
                t_ptr + rows64[:, None] * R + rs[None, :],
                mask=row_ok[:, None] & rs_ok[None, :],
                other=0.0,
            )
            q = tl.load(
                q_base + rs[:, None] * sqr + cols[None, :] * sqn,
                mask=rs_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
            lora = _dot((tc * scale).to(dtype), q, lora, PREC)
    if drop_out:
        keep = _keep(seed, rows, cols, N, drop_thr)
        lora = tl.where(keep, lora * inv_keep, 0.0)
    acc += lora
    if has_bias:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(
        out_ptr + rows64[:, None] * som + cols[None, :] * son,
        acc.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


@triton.jit
def lora_shrink_kernel(
    x_ptr, p_ptr, t_ptr, idx_ptr,
    M, K, R,
    sxm, sxk, spa, spk, spr,
    inv_keep, seed, drop_thr,
    drop_in,
    GATHER: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    """T (M, R) fp32 = drop(X) @ P, with P per row (GATHER, BM = 1 row per program) or shared."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    dtype = x_ptr.dtype.element_ty
    rows = pid_m * BM + tl.arange(0, BM)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    rs = pid_r * BR + tl.arange(0, BR)
    r_ok = rs < R
    if GATHER:
        a = tl.load(idx_ptr + pid_m)
        p_base = p_ptr + tl.maximum(a, 0).to(tl.int64) * spa
        t = tl.zeros((BR,), dtype=tl.float32)
    else:
        a = 0
        p_base = p_ptr
        t = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        k_ok = ks < K
        p = tl.load(
            p_base + ks[:, None] * spk + rs[None, :] * spr,
            mask=k_ok[:, None] & r_ok[None, :],
            other=0.0,
        )
        if GATHER:
            x = tl.load(x_ptr + pid_m.to(tl.int64) * sxm + ks * sxk, mask=k_ok, other=0.0)
            t += tl.sum(x.to(tl.float32)[:, None] * p.to(tl.float32), axis=0)
        else:
            x = tl.load(
                x_ptr + rows64[:, None] * sxm + ks[None, :] * sxk,
                mask=row_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            if drop_in:
                keep = _keep(seed, rows, ks, K, drop_thr)
                x = tl.where(keep, x.to(tl.float32) * inv_keep, 0.0).to(dtype)
            t = _dot(x, p, t, PREC)
    if GATHER:
        t = tl.where(a >= 0, t, 0.0)
        tl.store(t_ptr + pid_m.to(tl.int64) * R + rs, t, mask=r_ok)
    else:
        tl.store(t_ptr + rows64[:, None] * R + rs[None, :], t, mask=row_ok[:, None] & r_ok[None, :])


@triton.jit
def lora_matmul_tn_kernel(
    l_ptr, r_ptr, c_ptr, rows_ptr,
    M, P, Q,
    slm, slp, srm, srq, scp, scq,
    scaling, inv_keep, seed, drop_thr,
    drop_r, use_rows,
    BP: tl.constexpr, BQ: tl.constexpr, BM: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """C (P, Q) = scaling * L[rows].T @ drop(R[rows]); rows = the first M entries of rows_ptr
    (one adapter's rows) or 0..M-1. Dropout on R uses R's column count Q as the row length."""
    pid_p = tl.program_id(0)
    pid_q = tl.program_id(1)
    dtype = c_ptr.dtype.element_ty
    ps = pid_p * BP + tl.arange(0, BP)
    qs = pid_q * BQ + tl.arange(0, BQ)
    p_ok = ps < P
    q_ok = qs < Q
    acc = tl.zeros((BP, BQ), dtype=tl.float32)
    for m0 in range(0, M, BM):
        i = m0 + tl.arange(0, BM)
        i_ok = i < M
        if use_rows:
            rows = tl.load(rows_ptr + i, mask=i_ok, other=0)
        else:
            rows = i
        rows64 = rows.to(tl.int64)
        lt = tl.load(
            l_ptr + rows64[:, None] * slm + ps[None, :] * slp,
            mask=i_ok[:, None] & p_ok[None, :],
            other=0.0,
        )
        rt = tl.load(
            r_ptr + rows64[:, None] * srm + qs[None, :] * srq,
            mask=i_ok[:, None] & q_ok[None, :],
            other=0.0,
        )
        if drop_r:
            keep = _keep(seed, rows, qs, Q, drop_thr)
            rt = tl.where(keep, rt.to(tl.float32) * inv_keep, 0.0).to(rt.dtype)
        acc = _dot(tl.trans(lt.to(dtype)), rt.to(dtype), acc, PREC)
    tl.store(
        c_ptr + ps[:, None] * scp + qs[None, :] * scq,
        (acc * scaling).to(dtype),
        mask=p_ok[:, None] & q_ok[None, :],
    )


# ---- launch configuration ------------------------------------------------------------------


def _prec(dtype_name: str) -> str:
    # fp32 inputs use full-precision FMA dots: the parity rule asks 1e-5 of float64.
    return "ieee" if dtype_name == "fp32" else "tf32"


GATHER_MAX_ROWS = 16  # multi-adapter batches up to this many tokens use BGMV


def fused_config(m: int, dt: str) -> dict:
    """Tile sizes of the fused kernel (all spill-free on sm_80/sm_90, see AOT_SPECS): thin tiles
    for decode-sized batches; fp32 runs FMA dots (ieee), which need smaller tiles."""
    if m <= GATHER_MAX_ROWS:
        return {"BM": 16, "BN": 64, "num_warps": 4, "num_stages": 2 if dt == "fp32" else 3}
    if dt == "fp32":
        return {"BM": 32, "BN": 64, "num_warps": 8, "num_stages": 2}
    return {"BM": 64, "BN": 128, "num_warps": 8, "num_stages": 3}


def r_pad(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def reg_cap(dt: str, num_warps: int) -> int | None:
    """ptxas register cap: fp16/bf16 tiles spill under ptxas' own cap (128 on sm_90) and fit
    under the launchable maximum; fp32 tiles fit under ptxas' own choice and spill with .maxnreg
    set (AOT reports, triton 3.9)."""
    return None if dt == "fp32" else max_registers(num_warps)


def t_in_loop(r: int, mode: int = MODE_SINGLE, dtype: torch.dtype | None = None) -> bool:
    # fp32 segmented tiles (FMA dots plus the tile map) spill on sm_90 at any rank: buffer.
    if mode == MODE_SEGMENTED and dtype == torch.float32:
        return False
    return r_pad(r) <= (R_IN_LOOP_MAX_SEGMENTED if mode == MODE_SEGMENTED else R_IN_LOOP_MAX)


SHRINK_BM, SHRINK_BR = 32, 64


def shrink_bk(dt: str) -> int:
    return 32 if dt == "fp32" else 64


def tn_config(dt: str) -> dict:
    if dt == "fp32":
        return {"BP": 32, "BQ": 64, "BM": 16, "num_warps": 4, "num_stages": 2}
    return {"BP": 64, "BQ": 64, "BM": 32, "num_warps": 4, "num_stages": 2}


_DT_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


# ---- launchers -----------------------------------------------------------------------------


def _dummy(device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(1, device=device, dtype=dtype)


def _dropout_args(p: float) -> tuple[float, int]:
    """(1 / keep probability, 24-bit drop threshold); (1, 0) without dropout."""
    return (1.0 / (1.0 - p), dropout_threshold(p)) if p > 0 else (1.0, 0)


def _weight_strides(weight: torch.Tensor, fifo: bool, transpose: bool) -> tuple[int, int]:
    """(stride along the reduction dim, stride along the output dim) of the base operand:
    forward reduces over in-features, the input gradient over out-features."""
    s_out, s_in = (weight.stride(1), weight.stride(0)) if fifo else weight.stride()
    return (s_out, s_in) if transpose else (s_in, s_out)


def segment_tiles(indices: torch.Tensor, n_adapters: int, bm: int):
    """(perm, tiles, n_tiles): rows sorted by adapter (-1 first) and a tile map of
    (first sorted row, row count, adapter) per BM-row tile, one adapter per tile, built on the
    device without a host sync; ``n_tiles`` is an upper bound, surplus tiles have 0 rows."""
    idx = indices.to(torch.int64)
    m = idx.numel()
    perm = torch.argsort(idx, stable=True).to(torch.int32)
    counts = torch.bincount(idx + 1, minlength=n_adapters + 1)
    seg_start = torch.cumsum(counts, 0) - counts
    tiles_per = (counts + bm - 1) // bm
    tile_end = torch.cumsum(tiles_per, 0)
    n_tiles = triton.cdiv(m, bm) + n_adapters + 1
    t = torch.arange(n_tiles, device=idx.device)
    seg = torch.searchsorted(tile_end, t, right=True)
    live = seg <= n_adapters
    seg = seg.clamp(max=n_adapters)
    tile_in_seg = t - (tile_end[seg] - tiles_per[seg])
    count = (counts[seg] - tile_in_seg * bm).clamp(0, bm) * live
    start = seg_start[seg] + tile_in_seg * bm
    tiles = torch.stack([start * live, count, seg - 1], 1).to(torch.int32).contiguous()
    return perm, tiles, n_tiles


def _fused(
    x, w, bias, p, p_strides, q, q_strides, r, out, *, scaling=1.0, seed=0, p_drop=0.0,
    drop_in=False, drop_out=False, save=None, t_buf=None, mode=MODE_SINGLE, scal=None,
    idx=None, perm=None, tiles=None, n_tiles=0, cfg=None,
):  # fmt: skip
    m, k = x.shape
    n = out.shape[1]
    dev = x.device
    cfg = cfg or fused_config(m, _DT_NAMES[x.dtype])
    in_loop = t_buf is None and mode != MODE_GATHER
    inv_keep, thr = _dropout_args(p_drop)
    grid_m = n_tiles if mode == MODE_SEGMENTED else triton.cdiv(m, cfg["BM"])
    grid = (grid_m, triton.cdiv(n, cfg["BN"]))
    i32 = _dummy(dev, torch.int32)
    lora_fused_mm_kernel[grid](
        x, w[0], bias if bias is not None else x,
        p, q, t_buf if t_buf is not None else _dummy(dev), out,
        save if save is not None else _dummy(dev),
        scal if scal is not None else _dummy(dev), idx if idx is not None else i32,
        perm if perm is not None else i32, tiles if tiles is not None else i32,
        m, n, k, r,
        x.stride(0), x.stride(1), w[1], w[2], *p_strides, *q_strides,
        out.stride(0), out.stride(1),
        float(scaling), inv_keep, int(seed), thr,
        int(bias is not None), int(drop_in and p_drop > 0), int(drop_out and p_drop > 0),
        int(save is not None and in_loop),
        MODE=mode, T_IN_LOOP=in_loop, R_PAD=r_pad(r), BM=cfg["BM"], BN=cfg["BN"], BK=BK,
        R_CHUNK=R_CHUNK, PREC=_prec_of(x.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        maxnreg=reg_cap(_DT_NAMES[x.dtype], cfg["num_warps"]),
    )  # fmt: skip


def _prec_of(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _shrink(x, p, p_strides, r, t, *, p_drop=0.0, seed=0, idx=None):
    """t (M, r) fp32 = drop(x) @ P: shared P, or P[idx[m]] per row when ``idx`` is given."""
    m, k = x.shape
    inv_keep, thr = _dropout_args(p_drop)
    gather = idx is not None
    bm = 1 if gather else SHRINK_BM
    grid = (triton.cdiv(m, bm), triton.cdiv(r, SHRINK_BR))
    lora_shrink_kernel[grid](
        x, p, t, idx if gather else _dummy(x.device, torch.int32),
        m, k, r, x.stride(0), x.stride(1), *p_strides,
        inv_keep, int(seed), thr, int(p_drop > 0 and not gather),
        GATHER=gather, BM=bm, BR=SHRINK_BR, BK=BK if gather else shrink_bk(_DT_NAMES[x.dtype]),
        PREC=_prec_of(x.dtype), num_warps=4, num_stages=2, maxnreg=reg_cap(_DT_NAMES[x.dtype], 4),
    )  # fmt: skip


def _matmul_tn(lmat, rmat, c, *, scaling=1.0, p_drop=0.0, seed=0, rows=None, m=None):
    """c = scaling * lmat[rows].T @ drop(rmat[rows])."""
    m = lmat.shape[0] if m is None else m
    p_dim, q_dim = c.shape
    inv_keep, thr = _dropout_args(p_drop)
    cfg = tn_config(_DT_NAMES[c.dtype])
    grid = (triton.cdiv(p_dim, cfg["BP"]), triton.cdiv(q_dim, cfg["BQ"]))
    lora_matmul_tn_kernel[grid](
        lmat, rmat, c, rows if rows is not None else _dummy(c.device, torch.int32),
        m, p_dim, q_dim,
        lmat.stride(0), lmat.stride(1), rmat.stride(0), rmat.stride(1), c.stride(0), c.stride(1),
        float(scaling), inv_keep, int(seed), thr, int(p_drop > 0), int(rows is not None),
        BP=cfg["BP"], BQ=cfg["BQ"], BM=cfg["BM"], PREC=_prec_of(c.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        maxnreg=reg_cap(_DT_NAMES[c.dtype], cfg["num_warps"]),
    )  # fmt: skip


def lora_forward(x, weight, bias, lora_a, lora_b, scaling, p_drop, seed, fifo, out, xa):
    """out = x W^T + b + scaling (drop(x) A^T) B^T; xa (M, r) fp32 receives drop(x) A^T."""
    r = lora_a.shape[0]
    w = (weight, *_weight_strides(weight, fifo, transpose=False))
    p_strides = (0, lora_a.stride(1), lora_a.stride(0))
    q_strides = (0, lora_b.stride(1), lora_b.stride(0))
    t_buf = None
    if not t_in_loop(r):
        _shrink(x, lora_a, p_strides, r, xa, p_drop=p_drop, seed=seed)
        t_buf = xa
    _fused(
        x, w, bias, lora_a, p_strides, lora_b, q_strides, r, out, scaling=scaling, seed=seed,
        p_drop=p_drop, drop_in=True, save=xa, t_buf=t_buf,
    )  # fmt: skip


def _weight_grads(dy, x, fifo, need_w, need_b, dw, db):
    if need_w:
        if fifo:
            _matmul_tn(x, dy, dw)
        else:
            _matmul_tn(dy, x, dw)
    if need_b:
        db.copy_(dy.sum(0, dtype=torch.float32))


def lora_backward(
    dy, x, weight, lora_a, lora_b, xa, scaling, p_drop, seed, fifo, needs, grads
):  # fmt: skip
    """Fill ``grads`` = (dx, dW, db, dA, dB) where ``needs`` says so."""
    need_x, need_w, need_b, need_a, need_b_lora = needs
    dx, dw, db, da, dbl = grads
    r = lora_a.shape[0]
    m = dy.shape[0]
    p_strides = (0, lora_b.stride(0), lora_b.stride(1))  # P = B: (out, r)
    g = torch.empty(m, r, device=dy.device, dtype=torch.float32) if need_a else None
    if need_x:
        w = (weight, *_weight_strides(weight, fifo, transpose=True))
        t_buf = None
        if not t_in_loop(r):
            t_buf = g if g is not None else torch.empty(m, r, device=dy.device)
            _shrink(dy, lora_b, p_strides, r, t_buf)
        _fused(
            dy, w, None, lora_b, p_strides, lora_a, (0, lora_a.stride(0), lora_a.stride(1)), r,
            dx, scaling=scaling, seed=seed, p_drop=p_drop, drop_out=True, save=g, t_buf=t_buf,
        )  # fmt: skip
    elif g is not None:
        _shrink(dy, lora_b, p_strides, r, g)
    if need_a:
        _matmul_tn(g, x, da, scaling=scaling, p_drop=p_drop, seed=seed)
    if need_b_lora:
        _matmul_tn(dy, xa, dbl, scaling=scaling)
    _weight_grads(dy, x, fifo, need_w, need_b, dw, db)


def _multi_plan(indices, n_adapters, m, dtype):
    cfg = fused_config(m, _DT_NAMES[dtype])
    if m <= GATHER_MAX_ROWS:
        return MODE_GATHER, cfg, {}
    perm, tiles, n_tiles = segment_tiles(indices, n_adapters, cfg["BM"])
    return MODE_SEGMENTED, cfg, {"perm": perm, "tiles": tiles, "n_tiles": n_tiles}


def lora_multi_forward(x, weight, bias, a_stack, b_stack, scalings, indices, fifo, out, xa):
    """Row m: out = x W^T + b + scalings[a] (x A[a]^T) B[a]^T with a = indices[m] (-1: none)."""
    m = x.shape[0]
    n_adapters, r = a_stack.shape[0], a_stack.shape[1]
    mode, cfg, seg = _multi_plan(indices, n_adapters, m, x.dtype)
    p_strides = (a_stack.stride(0), a_stack.stride(2), a_stack.stride(1))
    q_strides = (b_stack.stride(0), b_stack.stride(2), b_stack.stride(1))
    t_buf = None
    if mode == MODE_GATHER or not t_in_loop(r, mode, x.dtype):
        _shrink(x, a_stack, p_strides, r, xa, idx=indices)
        t_buf = xa
    _fused(
        x, (weight, *_weight_strides(weight, fifo, transpose=False)), bias, a_stack, p_strides,
        b_stack, q_strides, r, out, save=xa, t_buf=t_buf, mode=mode, scal=scalings, idx=indices,
        cfg=cfg, **seg,
    )  # fmt: skip


def lora_multi_backward(
    dy, x, weight, a_stack, b_stack, scalings, indices, xa, fifo, needs, grads
):  # fmt: skip
    need_x, need_w, need_b, need_a, need_b_lora = needs
    dx, dw, db, da, dbl = grads
    m = dy.shape[0]
    n_adapters, r = a_stack.shape[0], a_stack.shape[1]
    p_strides = (b_stack.stride(0), b_stack.stride(1), b_stack.stride(2))  # P = B[a]: (out, r)
    g = torch.empty(m, r, device=dy.device, dtype=torch.float32) if need_a else None
    if need_x:
        mode, cfg, seg = _multi_plan(indices, n_adapters, m, dy.dtype)
        t_buf = None
        if mode == MODE_GATHER or not t_in_loop(r, mode, dy.dtype):
            t_buf = g if g is not None else torch.empty(m, r, device=dy.device)
            _shrink(dy, b_stack, p_strides, r, t_buf, idx=indices)
        _fused(
            dy, (weight, *_weight_strides(weight, fifo, transpose=True)), None, b_stack,
            p_strides, a_stack, (a_stack.stride(0), a_stack.stride(1), a_stack.stride(2)), r, dx,
            save=g, t_buf=t_buf, mode=mode, scal=scalings, idx=indices, cfg=cfg, **seg,
        )  # fmt: skip
    elif g is not None:
        _shrink(dy, b_stack, p_strides, r, g, idx=indices)
    if need_a or need_b_lora:
        # One launch per adapter over its rows (a loop over adapters, never over tokens).
        idx = indices.to(torch.int64)
        perm = torch.argsort(idx, stable=True).to(torch.int32)
        counts = torch.bincount(idx + 1, minlength=n_adapters + 1).tolist()
        scales = scalings.tolist()
        start = counts[0]
        for a in range(n_adapters):
            rows = perm[start : start + counts[a + 1]]
            if need_a:
                if rows.numel():
                    _matmul_tn(g, x, da[a], scaling=scales[a], rows=rows, m=rows.numel())
                else:
                    da[a].zero_()
            if need_b_lora:
                if rows.numel():
                    _matmul_tn(dy, xa, dbl[a], scaling=scales[a], rows=rows, m=rows.numel())
                else:
                    dbl[a].zero_()
            start += counts[a + 1]
    _weight_grads(dy, x, fifo, need_w, need_b, dw, db)


# ---- ahead-of-time variants ----------------------------------------------------------------

_DTYPES = ("fp32", "fp16", "bf16")


def _fused_sig(dt: str) -> dict[str, str]:
    sig = {
        "x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "bias_ptr": f"*{dt}", "p_ptr": f"*{dt}",
        "q_ptr": f"*{dt}", "t_ptr": "*fp32", "out_ptr": f"*{dt}", "save_ptr": "*fp32",
        "scal_ptr": "*fp32", "idx_ptr": "*i32", "perm_ptr": "*i32", "tile_ptr": "*i32",
    }  # fmt: skip
    for name in ("M", "N", "K", "R"):
        sig[name] = "i32"
    for name in ("sxm", "sxk", "swk", "swn", "spa", "spk", "spr", "sqa", "sqr", "sqn", "som"):
        sig[name] = "i64"
    sig.update(son="i64", scaling="fp32", inv_keep="fp32", seed="i64", drop_thr="i32")
    sig.update(has_bias="i32", drop_in="i32", drop_out="i32", save_t="i32")
    for name in ("MODE", "T_IN_LOOP", "R_PAD", "BM", "BN", "BK", "R_CHUNK", "PREC"):
        sig[name] = "constexpr"
    return sig


def _aot_specs() -> list[Spec]:
    specs = []
    for dt in _DTYPES:
        for m in (16, 4096):
            cfg = fused_config(m, dt)
            variants = [(MODE_SINGLE, True, rp) for rp in (16, 32, 64)]
            if dt != "fp32":
                variants += [(MODE_SEGMENTED, True, rp) for rp in (16, 32)]
            variants += [(MODE_SINGLE, False, 16), (MODE_SEGMENTED, False, 16)]
            if m <= 16:
                variants.append((MODE_GATHER, False, 16))
            for mode, in_loop, rp in variants:
                specs.append(
                    Spec(
                        lora_fused_mm_kernel,
                        _fused_sig(dt),
                        {
                            "MODE": mode,
                            "T_IN_LOOP": in_loop,
                            "R_PAD": rp,
                            "BM": cfg["BM"],
                            "BN": cfg["BN"],
                            "BK": BK,
                            "R_CHUNK": R_CHUNK,
                            "PREC": _prec(dt),
                        },  # fmt: skip
                        num_warps=cfg["num_warps"],
                        num_stages=cfg["num_stages"],
                        maxnreg=reg_cap(dt, cfg["num_warps"]),
                        label=f"{dt} mode{mode} {'loop' if in_loop else 'buf'} r{rp} bm{cfg['BM']}",
                    )
                )
        shrink_sig = {
            "x_ptr": f"*{dt}", "p_ptr": f"*{dt}", "t_ptr": "*fp32", "idx_ptr": "*i32",
            "M": "i32", "K": "i32", "R": "i32", "sxm": "i64", "sxk": "i64", "spa": "i64",
            "spk": "i64", "spr": "i64", "inv_keep": "fp32", "seed": "i64", "drop_thr": "i32",
            "drop_in": "i32", "GATHER": "constexpr", "BM": "constexpr", "BR": "constexpr",
            "BK": "constexpr", "PREC": "constexpr",
        }  # fmt: skip
        for gather in (False, True):
            specs.append(
                Spec(
                    lora_shrink_kernel,
                    shrink_sig,
                    {
                        "GATHER": gather,
                        "BM": 1 if gather else SHRINK_BM,
                        "BR": SHRINK_BR,
                        "BK": BK if gather else shrink_bk(dt),
                        "PREC": _prec(dt),
                    },  # fmt: skip
                    num_warps=4,
                    num_stages=2,
                    maxnreg=reg_cap(dt, 4),
                    label=f"{dt} {'gather' if gather else 'dense'}",
                )
            )
        # Operand dtypes of the weight-gradient GEMMs: (dy, x) for dW, (g fp32, x) for dA,
        # (dy, xa fp32) for dB; C has the parameter's dtype.
        for l_dt, r_dt in ((dt, dt), ("fp32", dt), (dt, "fp32")):
            tn_sig = {
                "l_ptr": f"*{l_dt}", "r_ptr": f"*{r_dt}", "c_ptr": f"*{dt}", "rows_ptr": "*i32",
                "M": "i32", "P": "i32", "Q": "i32", "slm": "i64", "slp": "i64", "srm": "i64",
                "srq": "i64", "scp": "i64", "scq": "i64", "scaling": "fp32", "inv_keep": "fp32",
                "seed": "i64", "drop_thr": "i32", "drop_r": "i32", "use_rows": "i32",
                "BP": "constexpr", "BQ": "constexpr", "BM": "constexpr", "PREC": "constexpr",
            }  # fmt: skip
            specs.append(
                Spec(
                    lora_matmul_tn_kernel,
                    tn_sig,
                    {
                        "BP": tn_config(dt)["BP"],
                        "BQ": tn_config(dt)["BQ"],
                        "BM": tn_config(dt)["BM"],
                        "PREC": _prec(dt),
                    },  # fmt: skip
                    num_warps=tn_config(dt)["num_warps"],
                    num_stages=tn_config(dt)["num_stages"],
                    maxnreg=reg_cap(dt, tn_config(dt)["num_warps"]),
                    label=f"{l_dt}x{r_dt}->{dt}",
                )
            )
    return specs


AOT_SPECS = _aot_specs()
