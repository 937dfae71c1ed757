"""Triton flash attention: forward (dense, varlen, kv-cache with split-KV), backward, combine.

The contract (scores, masking, dropout, lse) is documented in ``dlcore/ops/attention.py``. Every
kernel takes (B, H, L, D) strided views with unit stride in the head dim; packed varlen tensors
(total, H, D) are passed as (1, H, total, D) views with ``cu_seqlens`` and a zero batch stride.

Design:
- One program per (query block, batch x head[, KV split]); K/V blocks are streamed with an online
  softmax in fp32 (exp2 domain). Key blocks outside the causal/window band are skipped through the
  loop bounds; only the blocks crossing the band edges or the sequence end are masked.
- Head dims are padded to a power of two (BLOCK_D) with masked loads.
- The FEATURES constexpr selects the lean kernel (no bias, ALiBi, softcap or dropout: the hot
  path) or one where those four are runtime branches, so a single compiled variant covers every
  combination and the AOT report bounds its registers. Windows, varlen and per-batch cache
  lengths are runtime integers in both (cheap scalar work outside the masked blocks).
- Backward is FA2-style: delta = rowsum(dO * O); a dK/dV kernel per key block loops over the
  query heads of its KV group (so GQA sums without atomics); dQ either in a separate kernel
  (deterministic) or, for head dims <= 64, by fp32 atomics from the dK/dV kernel (fewer
  recomputed products, run-to-run nondeterministic).
"""

from __future__ import annotations

import inspect
import os

import torch
import triton
import triton.language as tl

from .aot import Spec

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _tanh(x):
    # tanh through the sigmoid: available in every Triton version and in the interpreter.
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """a @ b with fp32 accumulation; IEEE (interpreter only: fp32 inputs, and bf16 inputs whose
    interpreted tl.dot is broken): exact fp32 products instead of operands in b's dtype."""
    if IEEE:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        r = tl.dot(a.to(b.dtype), b)
    return r


@triton.jit
def _dot_acc(a, b, acc, IEEE: tl.constexpr):
    if IEEE:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        r = tl.dot(a.to(b.dtype), b, acc)
    return r


@triton.jit
def _dropout_keep(seed, rng_base, offs_m, offs_n, rng_lk, dropout_p):
    """Keep mask of the counter-based RNG: counter ((b*H + h)*Lq + i)*Lk + j."""
    counter = rng_base + offs_m[:, None].to(tl.int64) * rng_lk + offs_n[None, :]
    return tl.rand(seed, counter) >= dropout_p


@triton.jit
def _scores(
    qk,
    offs_m,
    offs_n,
    m_valid,
    bias_base,
    stride_bm,
    stride_bn,
    has_bias,
    slope,
    sm_scale,
    softcap,
    diag,
    window_left,
    window_right,
    seqlen_k,
    MASKED: tl.constexpr,
    FEATURES: tl.constexpr,
):
    """Scores in log2 units with invisible keys at -inf, and tanh(x / softcap) for the softcap
    derivative in backward (unused otherwise). FEATURES=False compiles out softcap, bias and
    ALiBi (the lean variant for plain attention)."""
    t = qk
    s = qk * (sm_scale * LOG2E)
    if FEATURES:
        if softcap > 0:
            t = _tanh(qk * (sm_scale / softcap))
            s = t * (softcap * LOG2E)
        if has_bias:
            b_mask = m_valid[:, None] & (offs_n[None, :] < seqlen_k)
            ptrs = bias_base + offs_m[:, None] * stride_bm + offs_n[None, :] * stride_bn
            s += tl.load(ptrs, mask=b_mask, other=0.0).to(tl.float32) * LOG2E
        if slope != 0:
            dist = tl.abs(offs_m[:, None] + diag - offs_n[None, :]).to(tl.float32)
            s -= (slope * LOG2E) * dist
    if MASKED:
        visible = (offs_m[:, None] * 0 + offs_n[None, :]) < seqlen_k
        if window_left >= 0:
            visible = visible & (offs_n[None, :] >= offs_m[:, None] + diag - window_left)
        if window_right >= 0:
            visible = visible & (offs_n[None, :] <= offs_m[:, None] + diag + window_right)
        s = tl.where(visible, s, float("-inf"))
    return s, t


@triton.jit
def _seq_info(b, Lq, Lk, diag_offset, CuSeqQ, CuSeqK, SeqlensK, BatchIdx, mode, has_batch_idx):
    """(q_start, k_start, seqlen_q, seqlen_k, diag, kv_batch) of batch row / sequence b.

    mode 0: dense; 1: varlen (cu_seqlens, bottom-right diagonal per sequence); 2: kv cache
    (per-batch key length, bottom-right diagonal, optional cache batch index)."""
    zero = b * 0
    q_start = zero
    k_start = zero
    seqlen_q = zero + Lq
    seqlen_k = zero + Lk
    diag = zero + diag_offset
    kv_b = b
    if mode == 1:
        q_start = tl.load(CuSeqQ + b)
        k_start = tl.load(CuSeqK + b)
        seqlen_q = tl.load(CuSeqQ + b + 1) - q_start
        seqlen_k = tl.load(CuSeqK + b + 1) - k_start
        diag = diag_offset + seqlen_k - seqlen_q
    if mode == 2:
        seqlen_k = tl.load(SeqlensK + b)
        diag = diag_offset + seqlen_k - seqlen_q
        if has_batch_idx:
            kv_b = tl.load(BatchIdx + b)
    return q_start, k_start, seqlen_q, seqlen_k, diag, kv_b


@triton.jit
def _fwd_block_range(
    start_m, seqlen_q, seqlen_k, diag, window_left, window_right, BLOCK_M, BLOCK_N
):
    """Key range [lo, hi) a query block can see, and [full_lo, full_hi): the blocks inside it
    that need no masking (fully visible to every valid row of the block)."""
    m_last = tl.minimum(start_m + BLOCK_M, seqlen_q) - 1
    lo = start_m * 0
    hi = seqlen_k + lo
    full_lo = lo
    full_end = hi
    if window_left >= 0:
        lo = tl.maximum(start_m + diag - window_left, 0) // BLOCK_N * BLOCK_N
        full_lo = (tl.maximum(m_last + diag - window_left, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    if window_right >= 0:
        hi = tl.minimum(hi, m_last + diag + window_right + 1)
        full_end = tl.minimum(full_end, start_m + diag + window_right + 1)
    hi = tl.maximum(hi, 0)
    full_end = tl.maximum(full_end, 0) // BLOCK_N * BLOCK_N
    return lo, hi, tl.maximum(full_lo, lo), full_end


@triton.jit
def _fwd_inner(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    stride_kn,
    stride_vn,
    lo,
    a,
    e,
    hi,
    offs_m,
    offs_d,
    m_valid,
    D,
    bias_base,
    stride_bm,
    stride_bn,
    has_bias,
    slope,
    sm_scale,
    softcap,
    diag,
    window_left,
    window_right,
    seqlen_k,
    seed,
    rng_base,
    rng_lk,
    dropout_p,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    IEEE: tl.constexpr,
    FEATURES: tl.constexpr,
):
    offs_n0 = tl.arange(0, BLOCK_N)
    # MASKED: the band-edge blocks [lo, a) and [e, hi) in one loop; else the interior [a, e).
    if MASKED:
        n_head = tl.cdiv(a - lo, BLOCK_N)
        n_total = n_head + tl.cdiv(hi - e, BLOCK_N)
    else:
        n_head = tl.cdiv(e - a, BLOCK_N)
        n_total = n_head
    for idx in range(0, n_total):
        if MASKED:
            start_n = tl.where(idx < n_head, lo + idx * BLOCK_N, e + (idx - n_head) * BLOCK_N)
        else:
            start_n = a + idx * BLOCK_N
        offs_n = start_n + offs_n0
        kv_mask = offs_d[None, :] < D
        if MASKED:
            kv_mask = kv_mask & (offs_n[:, None] < seqlen_k)
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        qk = _dot(q, tl.trans(k), IEEE)
        s, _ = _scores(
            qk, offs_m, offs_n, m_valid, bias_base, stride_bm, stride_bn, has_bias, slope,
            sm_scale, softcap, diag, window_left, window_right, seqlen_k, MASKED, FEATURES,
        )  # fmt: skip
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row whose scores are all -inf so far keeps p = 0 instead of exp(-inf + inf) = NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if FEATURES:
            if dropout_p > 0:
                keep = _dropout_keep(seed, rng_base, offs_m, offs_n, rng_lk, dropout_p)
                p = tl.where(keep, p, 0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = _dot_acc(p, v, acc, IEEE)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def attention_fwd_kernel(
    Q, K, V, Bias, Alibi, Out, Lse, CuSeqQ, CuSeqK, SeqlensK, BatchIdx,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_ab, stride_ah,
    stride_os, stride_ob, stride_oh, stride_om,
    stride_ls, stride_lb, stride_lh,
    H, H_K, Lq, Lk, D,
    sm_scale, diag_offset, window_left, window_right, softcap, dropout_p, seed,
    has_bias, has_alibi, mode, has_batch_idx, split_blocks,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
    FEATURES: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // (H // H_K)
    q_start, k_start, seqlen_q, seqlen_k, diag, kv_b = _seq_info(
        b, Lq, Lk, diag_offset, CuSeqQ, CuSeqK, SeqlensK, BatchIdx, mode, has_batch_idx
    )
    start_m = pid_m * BLOCK_M
    if start_m < seqlen_q:
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_valid = offs_m < seqlen_q
        q_base = Q + b.to(tl.int64) * stride_qb + h * stride_qh + q_start.to(tl.int64) * stride_qm
        q = tl.load(
            q_base + offs_m[:, None] * stride_qm + offs_d[None, :],
            mask=m_valid[:, None] & (offs_d[None, :] < D),
            other=0.0,
        )
        k_base = K + kv_b.to(tl.int64) * stride_kb + hk * stride_kh
        k_base += k_start.to(tl.int64) * stride_kn
        v_base = V + kv_b.to(tl.int64) * stride_vb + hk * stride_vh
        v_base += k_start.to(tl.int64) * stride_vn
        bias_base = Bias + b.to(tl.int64) * stride_bb + h * stride_bh
        slope = 0.0
        if has_alibi:
            slope = tl.load(Alibi + b * stride_ab + h * stride_ah).to(tl.float32)
        rng_base = (b * H + h).to(tl.int64) * Lq * Lk

        lo, hi, full_lo, full_end = _fwd_block_range(
            start_m, seqlen_q, seqlen_k, diag, window_left, window_right, BLOCK_M, BLOCK_N
        )
        if split_blocks > 0:
            lo = tl.maximum(lo, pid_s * split_blocks * BLOCK_N)
            hi = tl.minimum(hi, (pid_s + 1) * split_blocks * BLOCK_N)
            full_end = tl.minimum(full_end, (pid_s + 1) * split_blocks * BLOCK_N)
        a = tl.minimum(tl.maximum(full_lo, lo), hi)
        e = tl.maximum(full_end, a)

        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        # Masked band edge below the diagonal band, unmasked interior, masked tail.
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, lo, a, e, hi, offs_m, offs_d,
            m_valid, D, bias_base, stride_bm, stride_bn, has_bias, slope, sm_scale, softcap,
            diag, window_left, window_right, seqlen_k, seed, rng_base, Lk, dropout_p,
            BLOCK_N, True, IEEE, FEATURES,
        )  # fmt: skip
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, lo, a, e, hi, offs_m, offs_d,
            m_valid, D, bias_base, stride_bm, stride_bn, has_bias, slope, sm_scale, softcap,
            diag, window_left, window_right, seqlen_k, seed, rng_base, Lk, dropout_p,
            BLOCK_N, False, IEEE, FEATURES,
        )  # fmt: skip

        empty = l_i == 0.0
        inv_l = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, l_i))
        if dropout_p > 0:
            inv_l = inv_l / (1.0 - dropout_p)
        out = acc * inv_l[:, None]
        lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * LN2)
        o_base = Out + pid_s * stride_os + b.to(tl.int64) * stride_ob + h * stride_oh
        o_base += q_start.to(tl.int64) * stride_om
        tl.store(
            o_base + offs_m[:, None] * stride_om + offs_d[None, :],
            out.to(Out.dtype.element_ty),
            mask=m_valid[:, None] & (offs_d[None, :] < D),
        )
        l_base = Lse + pid_s * stride_ls + b.to(tl.int64) * stride_lb + h * stride_lh + q_start
        tl.store(l_base + offs_m, lse, mask=m_valid)


@triton.jit
def attention_combine_kernel(
    OutPart, LsePart, Out, Lse, n_splits, rows, H, Lq, D,
    stride_ps, stride_ls,
    stride_ob, stride_oh, stride_om,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Merge split-KV partials: lse = logsumexp_s lse_s, out = sum_s exp(lse_s - lse) out_s.
    Partials are contiguous (S, B, H, Lq, D) / (S, B, H, Lq) fp32; rows index (b, h, i)."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    r_valid = offs_r < rows
    m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    for s in range(0, n_splits):
        m = tl.maximum(m, tl.load(LsePart + s * stride_ls + offs_r, mask=r_valid, other=0.0))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    total = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    mask2 = r_valid[:, None] & (offs_d[None, :] < D)
    for s in range(0, n_splits):
        w = tl.math.exp2(
            (tl.load(LsePart + s * stride_ls + offs_r, mask=r_valid, other=0.0) - m_safe) * LOG2E
        )
        total += w
        part = tl.load(
            OutPart + s * stride_ps + offs_r[:, None] * D + offs_d[None, :], mask=mask2, other=0.0
        )
        acc += w[:, None] * part
    empty = total == 0.0
    out = acc / tl.where(empty, 1.0, total)[:, None]
    lse = tl.where(empty, float("-inf"), m_safe + tl.log(tl.where(empty, 1.0, total)))
    b = offs_r // (H * Lq)
    h = (offs_r // Lq) % H
    i = offs_r % Lq
    row_off = b.to(tl.int64) * stride_ob + h * stride_oh + i * stride_om
    tl.store(Out + row_off[:, None] + offs_d[None, :], out.to(Out.dtype.element_ty), mask=mask2)
    tl.store(Lse + offs_r, lse, mask=r_valid)


@triton.jit
def attention_bwd_preprocess_kernel(
    Out, DOut, Delta, H, Lq, D,
    stride_ob, stride_oh, stride_om,
    stride_db, stride_dh, stride_dm,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """delta[b, h, i] = sum_d dO * O (fp32, contiguous (B, H, Lq))."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < Lq) & (offs_d[None, :] < D)
    o = tl.load(
        Out + b.to(tl.int64) * stride_ob + h * stride_oh + offs_m[:, None] * stride_om
        + offs_d[None, :], mask=mask, other=0.0,
    ).to(tl.float32)  # fmt: skip
    do = tl.load(
        DOut + b.to(tl.int64) * stride_db + h * stride_dh + offs_m[:, None] * stride_dm
        + offs_d[None, :], mask=mask, other=0.0,
    ).to(tl.float32)  # fmt: skip
    tl.store(Delta + pid_bh.to(tl.int64) * Lq + offs_m, tl.sum(o * do, 1), mask=offs_m < Lq)


@triton.jit
def _probs_and_dscores(
    q, k, v, do, lse2, delta, offs_m, offs_n, m_valid, bias_base, stride_bm, stride_bn,
    has_bias, slope, sm_scale, softcap, diag, window_left, window_right, seqlen_k,
    seed, rng_base, rng_lk, dropout_p,
    MASKED: tl.constexpr, IEEE: tl.constexpr, FEATURES: tl.constexpr,
):  # fmt: skip
    """Recompute P (dropped and rescaled, as used by the forward) and dS = dL/d(score)."""
    qk = _dot(q, tl.trans(k), IEEE)
    dp = _dot(do, tl.trans(v), IEEE)
    s, t = _scores(
        qk, offs_m, offs_n, m_valid, bias_base, stride_bm, stride_bn, has_bias, slope, sm_scale,
        softcap, diag, window_left, window_right, seqlen_k, MASKED, FEATURES,
    )  # fmt: skip
    p = tl.math.exp2(s - lse2[:, None])
    p_used = p
    if FEATURES:
        if dropout_p > 0:
            keep = _dropout_keep(seed, rng_base, offs_m, offs_n, rng_lk, dropout_p)
            p_used = tl.where(keep, p / (1.0 - dropout_p), 0.0)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
    ds = p * (dp - delta[:, None])
    if FEATURES:
        if softcap > 0:
            ds = ds * (1.0 - t * t)
    return p_used, ds


@triton.jit
def _bwd_dkdv_inner(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base,
    stride_qm, stride_dom, stride_dqm, lo, a, e, hi, offs_n, offs_d, seqlen_q, D,
    bias_base, stride_bm, stride_bn, has_bias, slope, sm_scale, softcap, diag,
    window_left, window_right, seqlen_k, seed, rng_base, rng_lk, dropout_p,
    BLOCK_M: tl.constexpr, MASKED: tl.constexpr, IEEE: tl.constexpr, FEATURES: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,
):  # fmt: skip
    offs_m0 = tl.arange(0, BLOCK_M)
    # MASKED: the band-edge blocks [lo, a) and [e, hi) in one loop; else the interior [a, e).
    if MASKED:
        n_head = tl.cdiv(a - lo, BLOCK_M)
        n_total = n_head + tl.cdiv(hi - e, BLOCK_M)
    else:
        n_head = tl.cdiv(e - a, BLOCK_M)
        n_total = n_head
    for idx in range(0, n_total):
        if MASKED:
            start_m = tl.where(idx < n_head, lo + idx * BLOCK_M, e + (idx - n_head) * BLOCK_M)
        else:
            start_m = a + idx * BLOCK_M
        offs_m = start_m + offs_m0
        m_valid = offs_m < seqlen_q
        mask = m_valid[:, None] & (offs_d[None, :] < D)
        q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], mask=mask, other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_d[None, :], mask=mask, other=0.0)
        lse = tl.load(lse_base + offs_m, mask=m_valid, other=float("inf"))
        # Rows without a visible key (lse = -inf) have P = 0: an lse of +inf gives exactly that.
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
        delta = tl.load(delta_base + offs_m, mask=m_valid, other=0.0)
        p, ds = _probs_and_dscores(
            q, k, v, do, lse2, delta, offs_m, offs_n, m_valid, bias_base, stride_bm, stride_bn,
            has_bias, slope, sm_scale, softcap, diag, window_left, window_right, seqlen_k,
            seed, rng_base, rng_lk, dropout_p, MASKED, IEEE, FEATURES,
        )  # fmt: skip
        dv = _dot_acc(tl.trans(p), do, dv, IEEE)
        dk = _dot_acc(tl.trans(ds), q, dk, IEEE)
        if ATOMIC_DQ:
            dq = _dot(ds, k, IEEE)
            tl.atomic_add(
                dq_base + offs_m[:, None] * stride_dqm + offs_d[None, :], dq * sm_scale, mask=mask
            )
    return dk, dv


@triton.jit
def attention_bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, Bias, Alibi, DK, DV, DQAcc, CuSeqQ, CuSeqK,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_ab, stride_ah,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_dqb, stride_dqh, stride_dqm,
    stride_sb, stride_sh,
    H, H_K, Lq, Lk, D,
    sm_scale, diag_offset, window_left, window_right, softcap, dropout_p, seed,
    has_bias, has_alibi, mode,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
    FEATURES: tl.constexpr, ATOMIC_DQ: tl.constexpr,
):  # fmt: skip
    """dK, dV of one key block, summed over the query heads of its KV group; optionally dQ by
    atomics. Lse and Delta are fp32 (B, H, Lq) or, for varlen, (H, total_q) (zero batch stride)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H_K
    hk = pid_bh % H_K
    group = H // H_K
    q_start, k_start, seqlen_q, seqlen_k, diag, kv_b = _seq_info(
        b, Lq, Lk, diag_offset, CuSeqQ, CuSeqK, CuSeqK, CuSeqK, mode, 0
    )
    start_n = pid_n * BLOCK_N
    if start_n < seqlen_k:
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        n_valid = offs_n < seqlen_k
        kv_mask = n_valid[:, None] & (offs_d[None, :] < D)
        k_rows = (k_start + offs_n)[:, None]
        k = tl.load(
            K + b.to(tl.int64) * stride_kb + hk * stride_kh + k_rows * stride_kn + offs_d[None, :],
            mask=kv_mask, other=0.0,
        )  # fmt: skip
        v = tl.load(
            V + b.to(tl.int64) * stride_vb + hk * stride_vh + k_rows * stride_vn + offs_d[None, :],
            mask=kv_mask, other=0.0,
        )  # fmt: skip
        # Query rows that see this key block: [m_lo, m_hi); [a, e) see all of it unmasked.
        n_last = tl.minimum(start_n + BLOCK_N, seqlen_k) - 1
        m_lo = start_n * 0
        m_hi = seqlen_q + m_lo
        full_lo = m_lo
        full_end = seqlen_q // BLOCK_M * BLOCK_M
        if window_right >= 0:
            m_lo = tl.maximum(start_n - diag - window_right, 0) // BLOCK_M * BLOCK_M
            full_lo = (tl.maximum(n_last - diag - window_right, 0) + BLOCK_M - 1) // BLOCK_M
            full_lo = full_lo * BLOCK_M
        if window_left >= 0:
            m_hi = tl.maximum(tl.minimum(m_hi, n_last - diag + window_left + 1), 0)
            full_end = tl.minimum(
                full_end, tl.maximum(start_n - diag + window_left + 1, 0) // BLOCK_M * BLOCK_M
            )
        if start_n + BLOCK_N > seqlen_k:
            full_end = 0
        a = tl.minimum(tl.maximum(full_lo, m_lo), m_hi)
        e = tl.maximum(full_end, a)

        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for g in range(0, group):
            h = hk * group + g
            row0 = q_start.to(tl.int64)
            q_base = Q + b.to(tl.int64) * stride_qb + h * stride_qh + row0 * stride_qm
            do_base = DO + b.to(tl.int64) * stride_dob + h * stride_doh + row0 * stride_dom
            dq_base = DQAcc + b.to(tl.int64) * stride_dqb + h * stride_dqh + row0 * stride_dqm
            stat_off = b.to(tl.int64) * stride_sb + h * stride_sh + row0
            lse_base = Lse + stat_off
            delta_base = Delta + stat_off
            bias_base = Bias + b.to(tl.int64) * stride_bb + h * stride_bh
            slope = 0.0
            if has_alibi:
                slope = tl.load(Alibi + b * stride_ab + h * stride_ah).to(tl.float32)
            rng_base = (b * H + h).to(tl.int64) * Lq * Lk
            dk, dv = _bwd_dkdv_inner(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, stride_qm,
                stride_dom, stride_dqm, m_lo, a, e, m_hi, offs_n, offs_d, seqlen_q, D, bias_base,
                stride_bm, stride_bn, has_bias, slope, sm_scale, softcap, diag, window_left,
                window_right, seqlen_k, seed, rng_base, Lk, dropout_p,
                BLOCK_M, True, IEEE, FEATURES, ATOMIC_DQ,
            )  # fmt: skip
            dk, dv = _bwd_dkdv_inner(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, stride_qm,
                stride_dom, stride_dqm, m_lo, a, e, m_hi, offs_n, offs_d, seqlen_q, D, bias_base,
                stride_bm, stride_bn, has_bias, slope, sm_scale, softcap, diag, window_left,
                window_right, seqlen_k, seed, rng_base, Lk, dropout_p,
                BLOCK_M, False, IEEE, FEATURES, ATOMIC_DQ,
            )  # fmt: skip
        dk_ptrs = DK + b.to(tl.int64) * stride_dkb + hk * stride_dkh + k_rows * stride_dkn
        dv_ptrs = DV + b.to(tl.int64) * stride_dvb + hk * stride_dvh + k_rows * stride_dvn
        tl.store(dk_ptrs + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(dv_ptrs + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_inner(
    dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, lo, a, e, hi, offs_m, offs_d,
    m_valid, D, bias_base, stride_bm, stride_bn, has_bias, slope, sm_scale, softcap, diag,
    window_left, window_right, seqlen_k, seed, rng_base, rng_lk, dropout_p,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, IEEE: tl.constexpr, FEATURES: tl.constexpr,
):  # fmt: skip
    offs_n0 = tl.arange(0, BLOCK_N)
    # MASKED: the band-edge blocks [lo, a) and [e, hi) in one loop; else the interior [a, e).
    if MASKED:
        n_head = tl.cdiv(a - lo, BLOCK_N)
        n_total = n_head + tl.cdiv(hi - e, BLOCK_N)
    else:
        n_head = tl.cdiv(e - a, BLOCK_N)
        n_total = n_head
    for idx in range(0, n_total):
        if MASKED:
            start_n = tl.where(idx < n_head, lo + idx * BLOCK_N, e + (idx - n_head) * BLOCK_N)
        else:
            start_n = a + idx * BLOCK_N
        offs_n = start_n + offs_n0
        kv_mask = offs_d[None, :] < D
        if MASKED:
            kv_mask = kv_mask & (offs_n[:, None] < seqlen_k)
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        _, ds = _probs_and_dscores(
            q, k, v, do, lse2, delta, offs_m, offs_n, m_valid, bias_base, stride_bm, stride_bn,
            has_bias, slope, sm_scale, softcap, diag, window_left, window_right, seqlen_k,
            seed, rng_base, rng_lk, dropout_p, MASKED, IEEE, FEATURES,
        )  # fmt: skip
        dq = _dot_acc(ds, k, dq, IEEE)
    return dq


@triton.jit
def attention_bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, Bias, Alibi, DQ, CuSeqQ, CuSeqK,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_ab, stride_ah,
    stride_dqb, stride_dqh, stride_dqm,
    stride_sb, stride_sh,
    H, H_K, Lq, Lk, D,
    sm_scale, diag_offset, window_left, window_right, softcap, dropout_p, seed,
    has_bias, has_alibi, mode,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
    FEATURES: tl.constexpr,
):  # fmt: skip
    """dQ of one query block, looping over the visible key blocks (no atomics: deterministic)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // (H // H_K)
    q_start, k_start, seqlen_q, seqlen_k, diag, kv_b = _seq_info(
        b, Lq, Lk, diag_offset, CuSeqQ, CuSeqK, CuSeqK, CuSeqK, mode, 0
    )
    start_m = pid_m * BLOCK_M
    if start_m < seqlen_q:
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_valid = offs_m < seqlen_q
        mask = m_valid[:, None] & (offs_d[None, :] < D)
        row0 = q_start.to(tl.int64)
        q_base = Q + b.to(tl.int64) * stride_qb + h * stride_qh + row0 * stride_qm
        do_base = DO + b.to(tl.int64) * stride_dob + h * stride_doh + row0 * stride_dom
        q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], mask=mask, other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_d[None, :], mask=mask, other=0.0)
        stat_off = b.to(tl.int64) * stride_sb + h * stride_sh + row0
        lse = tl.load(Lse + stat_off + offs_m, mask=m_valid, other=float("inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
        delta = tl.load(Delta + stat_off + offs_m, mask=m_valid, other=0.0)
        k_base = K + b.to(tl.int64) * stride_kb + hk * stride_kh + k_start.to(tl.int64) * stride_kn
        v_base = V + b.to(tl.int64) * stride_vb + hk * stride_vh + k_start.to(tl.int64) * stride_vn
        bias_base = Bias + b.to(tl.int64) * stride_bb + h * stride_bh
        slope = 0.0
        if has_alibi:
            slope = tl.load(Alibi + b * stride_ab + h * stride_ah).to(tl.float32)
        rng_base = (b * H + h).to(tl.int64) * Lq * Lk
        lo, hi, full_lo, full_end = _fwd_block_range(
            start_m, seqlen_q, seqlen_k, diag, window_left, window_right, BLOCK_M, BLOCK_N
        )
        a = tl.minimum(tl.maximum(full_lo, lo), hi)
        e = tl.maximum(full_end, a)
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        dq = _bwd_dq_inner(
            dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, lo, a, e, hi, offs_m,
            offs_d, m_valid, D, bias_base, stride_bm, stride_bn, has_bias, slope, sm_scale, softcap,
            diag, window_left, window_right, seqlen_k, seed, rng_base, Lk, dropout_p,
            BLOCK_N, True, IEEE, FEATURES,
        )  # fmt: skip
        dq = _bwd_dq_inner(
            dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, lo, a, e, hi, offs_m,
            offs_d, m_valid, D, bias_base, stride_bm, stride_bn, has_bias, slope, sm_scale, softcap,
            diag, window_left, window_right, seqlen_k, seed, rng_base, Lk, dropout_p,
            BLOCK_N, False, IEEE, FEATURES,
        )  # fmt: skip
        dq_ptrs = DQ + b.to(tl.int64) * stride_dqb + h * stride_dqh + row0 * stride_dqm
        dq_ptrs += offs_m[:, None] * stride_dqm + offs_d[None, :]
        tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Tile configs and launchers
# ---------------------------------------------------------------------------------------------


def block_d(head_dim: int) -> int:
    """Head dim padded to the power of two the kernels tile with (at least 32)."""
    return max(32, triton.next_power_of_2(head_dim))


def _cfg(bm: int, bn: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


# Tile configs per (variant, BLOCK_D). Variants: "plain" = fp16/bf16 without bias, ALiBi, softcap
# or dropout (the hot path, autotuned over large tensor-core tiles); "features" = fp16/bf16 with
# any of them (runtime branches, so one compiled kernel covers every combination; tiles kept
# smaller for the extra registers). fp32 CUDA inputs run on the eager backend: with
# fp32-accurate products (exact FMA dot or 3xTF32) every tile size spilled registers at D >= 128.
# BLOCK_M tiles queries and BLOCK_N keys in every kernel.
FWD_CONFIGS = {
    ("plain", 32): [_cfg(128, 64, 8, 3)],
    ("plain", 64): [_cfg(128, 64, 8, 3)],
    ("plain", 128): [_cfg(64, 64, 8, 2)],
    ("plain", 256): [_cfg(32, 32, 8, 2)],
    ("features", 32): [_cfg(64, 64, 8, 2)],
    ("features", 64): [_cfg(64, 64, 8, 2)],
    ("features", 128): [_cfg(64, 32, 8, 2)],
    ("features", 256): [_cfg(32, 32, 8, 2)],
}
# Backward tiles, sized from sm_80/sm_90 AOT reports so that dK/dV accumulators, K/V in two
# operand layouts and the Q/dO tiles fit without spills. The dK/dV kernel with atomic dQ (the
# nondeterministic path) needs extra registers for the dQ pointers, so it only runs up to
# BLOCK_D 64; larger head dims always use the separate dQ kernel.
ATOMIC_DQ_MAX_BLOCK_D = 64
DKDV_CONFIGS = {
    ("plain", 32): [_cfg(32, 64, 8, 2)],
    ("plain", 64): [_cfg(32, 32, 8, 2)],
    ("plain", 128): [_cfg(32, 64, 8, 2)],
    ("plain", 256): [_cfg(16, 32, 8, 1)],
    ("features", 32): [_cfg(16, 32, 8, 2)],
    ("features", 64): [_cfg(16, 32, 8, 2)],
    ("features", 128): [_cfg(16, 32, 8, 2)],
    ("features", 256): [_cfg(16, 16, 8, 1)],
}
DQ_CONFIGS = {
    ("plain", 32): [_cfg(64, 64, 8, 2)],
    ("plain", 64): [_cfg(64, 64, 8, 2)],
    ("plain", 128): [_cfg(64, 32, 8, 2)],
    ("plain", 256): [_cfg(32, 32, 8, 1)],
    ("features", 32): [_cfg(64, 32, 8, 2)],
    ("features", 64): [_cfg(64, 32, 8, 2)],
    ("features", 128): [_cfg(32, 32, 8, 2)],
    ("features", 256): [_cfg(16, 32, 8, 1)],
}
# Decoding (few query rows): 16-row query tiles, FEATURES on, fp32 partial outputs merged by the
# combine kernel (split-KV fills the machine when batch x heads cannot).
DECODE_CONFIGS = {
    ("features", 32): _cfg(16, 64, 4, 2),
    ("features", 64): _cfg(16, 64, 4, 2),
    ("features", 128): _cfg(16, 64, 8, 2),
    ("features", 256): _cfg(16, 32, 8, 2),
}
# The interpreter runs one small tile so tests cross several blocks with short sequences.
INTERPRET_CONFIG = _cfg(32, 32, 4, 1)
COMBINE_BLOCK_R = 16


def _pre_block_m(bd: int) -> int:
    # 2048-element tiles of O and dO: 16 values each per thread of 4 warps (4096-element tiles
    # spilled on sm_80 at D 32 and 64, per ptxas' log).
    return 2048 // bd


_TUNE_KEY = ["D", "window_left", "window_right"]


def _tuned(kernel, configs: dict, reset=()) -> dict:
    return {
        key: triton.autotune(configs=cfgs, key=_TUNE_KEY, reset_to_zero=list(reset) or None)(kernel)
        for key, cfgs in configs.items()
    }


_FWD_TUNED = _tuned(attention_fwd_kernel, FWD_CONFIGS)
_DKDV_TUNED = _tuned(attention_bwd_dkdv_kernel, DKDV_CONFIGS, ("DQAcc",))
_DQ_TUNED = _tuned(attention_bwd_dq_kernel, DQ_CONFIGS)


def _variant(dtype: torch.dtype, features: bool) -> tuple[str, bool]:
    """(config variant, IEEE). On GPUs the launchers take fp16/bf16 (the ops layer sends fp32
    CUDA inputs to the eager backend); the interpreter also runs fp32, and bf16 with fp32
    products because its bf16 tl.dot returns garbage (triton 3.9)."""
    ieee = INTERPRET and dtype in (torch.float32, torch.bfloat16)
    return ("features" if features else "plain"), ieee


def _config_kwargs(cfg: triton.Config) -> dict:
    return {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def _strides(t: torch.Tensor | None, n: int, varlen: bool = False) -> tuple[int, ...]:
    """Leading ``n`` strides; packed varlen tensors are (1, H, total, D) views whose batch
    stride must read as 0 (the kernels offset rows by cu_seqlens instead)."""
    if t is None:
        return (0,) * n
    st = tuple(t.stride()[:n])
    return (0,) + st[1:] if varlen else st


def _bias_strides(bias: torch.Tensor | None) -> tuple[int, int, int, int]:
    return tuple(bias.stride()) if bias is not None else (0, 0, 0, 0)


def _alibi_strides(alibi: torch.Tensor | None) -> tuple[int, int]:
    return tuple(alibi.stride()) if alibi is not None else (0, 0)


def _dummy(t: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(1, dtype=dtype, device=t.device)


def num_splits_heuristic(programs: int, seqlen_k: int, block_n: int) -> int:
    """Split the keys when the query tiles alone cannot fill the GPU (decoding)."""
    if INTERPRET or not torch.cuda.is_available():
        return 1
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    if programs >= sms:
        return 1
    # At least 4 key blocks per split so the combine stays cheap.
    return max(1, min(triton.cdiv(2 * sms, programs), triton.cdiv(seqlen_k, block_n) // 4, 64))


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
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int = 0,
    max_seqlen_k: int = 0,
    seqlens_k: torch.Tensor | None = None,
    batch_idx: torch.Tensor | None = None,
    num_splits: int = 0,
) -> None:
    """Forward launcher. Dense: q/out (B,H,Lq,D), k/v (B,Hk,Lk,D), lse (B,H,Lq). Varlen
    (``cu_seqlens_*``): (1,H,total,D) views, lse (1,H,total_q). kv cache (``seqlens_k``): k/v are
    the caches (B_cache,Hk,Lmax,D), ``seqlens_k`` (B,) int32 key lengths, ``batch_idx`` the
    cache row of each batch row; the keys are split ``num_splits`` ways (0: heuristic)."""
    B, H, Lq, D = q.shape
    Hk, Lk = k.shape[1], k.shape[2]
    bd = block_d(D)
    mode = 1 if cu_seqlens_q is not None else (2 if seqlens_k is not None else 0)
    varlen = mode == 1
    decode = mode == 2
    features = decode or bias is not None or alibi_slopes is not None
    features = features or softcap > 0 or dropout_p > 0
    variant, ieee = _variant(q.dtype, features)
    n_seq = cu_seqlens_q.numel() - 1 if varlen else B
    rows_q = max_seqlen_q if varlen else Lq
    rows_k = max_seqlen_k if varlen else Lk
    dummy, dummy_i = _dummy(q), _dummy(q, torch.int32)
    if decode:
        cfg = INTERPRET_CONFIG if INTERPRET else DECODE_CONFIGS[(variant, bd)]
        bn = cfg.kwargs["BLOCK_N"]
        if num_splits <= 0:
            num_splits = num_splits_heuristic(
                B * H * triton.cdiv(Lq, cfg.kwargs["BLOCK_M"]), Lk, bn
            )
        split_blocks = triton.cdiv(triton.cdiv(Lk, bn), num_splits)
        num_splits = triton.cdiv(triton.cdiv(Lk, bn), split_blocks)
        o_dst = torch.empty((num_splits, B, H, Lq, D), dtype=torch.float32, device=q.device)
        l_dst = torch.empty((num_splits, B, H, Lq), dtype=torch.float32, device=q.device)
        o_strides, l_strides = tuple(o_dst.stride()[:4]), tuple(l_dst.stride()[:3])
    else:
        cfg = INTERPRET_CONFIG if INTERPRET else None
        num_splits, split_blocks = 1, 0
        o_dst, l_dst = out, lse
        o_strides = (0,) + _strides(out, 3, varlen)
        l_strides = (0,) + _strides(lse, 2, varlen)
    args = (
        q, k, v,
        bias if bias is not None else dummy,
        alibi_slopes if alibi_slopes is not None else dummy,
        o_dst, l_dst,
        cu_seqlens_q if cu_seqlens_q is not None else dummy_i,
        cu_seqlens_k if cu_seqlens_k is not None else dummy_i,
        seqlens_k if seqlens_k is not None else dummy_i,
        batch_idx if batch_idx is not None else dummy_i,
        *_strides(q, 3, varlen), *_strides(k, 3, varlen), *_strides(v, 3, varlen),
        *_bias_strides(bias), *_alibi_strides(alibi_slopes), *o_strides, *l_strides,
        H, Hk, rows_q, rows_k, D,
        float(scale), int(diag_offset), int(window_left), int(window_right), float(softcap),
        float(dropout_p), int(seed),
        int(bias is not None), int(alibi_slopes is not None), mode, int(batch_idx is not None),
        split_blocks,
    )  # fmt: skip
    const = {"BLOCK_D": bd, "IEEE": ieee, "FEATURES": features}
    if cfg is not None:
        grid = (triton.cdiv(rows_q, cfg.kwargs["BLOCK_M"]), n_seq * H, num_splits)
        attention_fwd_kernel[grid](*args, **const, **_config_kwargs(cfg))
    else:
        _FWD_TUNED[(variant, bd)][lambda m: (triton.cdiv(rows_q, m["BLOCK_M"]), n_seq * H, 1)](
            *args, **const
        )
    if decode:
        rows = B * H * Lq
        attention_combine_kernel[(triton.cdiv(rows, COMBINE_BLOCK_R),)](
            o_dst, l_dst, out, lse, num_splits, rows, H, Lq, D,
            o_dst.stride(0), l_dst.stride(0), *_strides(out, 3),
            BLOCK_R=COMBINE_BLOCK_R, BLOCK_D=bd, num_warps=4,
        )  # fmt: skip


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
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    *,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int = 0,
    max_seqlen_k: int = 0,
) -> None:
    """Backward launcher; shapes as ``attention_fwd`` (dense or varlen); lse contiguous fp32."""
    B, H, Lq, D = q.shape
    Hk, Lk = k.shape[1], k.shape[2]
    bd = block_d(D)
    features = bias is not None or alibi_slopes is not None or softcap > 0 or dropout_p > 0
    variant, ieee = _variant(q.dtype, features)
    varlen = cu_seqlens_q is not None
    n_seq = cu_seqlens_q.numel() - 1 if varlen else B
    rows_q = max_seqlen_q if varlen else Lq
    rows_k = max_seqlen_k if varlen else Lk
    dummy, dummy_i = _dummy(q), _dummy(q, torch.int32)
    # Delta laid out like lse: (B, H, Lq) dense, (1, H, total_q) varlen.
    delta = torch.empty_like(lse)
    pre_m = _pre_block_m(bd)
    attention_bwd_preprocess_kernel[(triton.cdiv(Lq, pre_m), B * H)](
        out, dout, delta, H, Lq, D, *_strides(out, 3), *_strides(dout, 3),
        BLOCK_M=pre_m, BLOCK_D=bd, num_warps=4,
    )  # fmt: skip
    atomic = not deterministic and bd <= ATOMIC_DQ_MAX_BLOCK_D
    dq_acc = torch.zeros(dq.shape, dtype=torch.float32, device=q.device) if atomic else dummy
    seq_ptrs = (
        cu_seqlens_q if varlen else dummy_i,
        cu_seqlens_k if varlen else dummy_i,
    )
    common = (
        *_strides(q, 3, varlen), *_strides(k, 3, varlen), *_strides(v, 3, varlen),
        *_strides(dout, 3, varlen), *_bias_strides(bias), *_alibi_strides(alibi_slopes),
    )  # fmt: skip
    scalars = (
        H, Hk, rows_q, rows_k, D,
        float(scale), int(diag_offset), int(window_left), int(window_right), float(softcap),
        float(dropout_p), int(seed), int(bias is not None), int(alibi_slopes is not None),
        int(varlen),
    )  # fmt: skip
    bias_t = bias if bias is not None else dummy
    alibi_t = alibi_slopes if alibi_slopes is not None else dummy
    dkdv_args = (
        q, k, v, dout, lse, delta, bias_t, alibi_t, dk, dv, dq_acc, *seq_ptrs,
        *common, *_strides(dk, 3, varlen), *_strides(dv, 3, varlen),
        *_strides(dq_acc if atomic else dq, 3, varlen), *_strides(lse, 2, varlen), *scalars,
    )  # fmt: skip
    dq_args = (
        q, k, v, dout, lse, delta, bias_t, alibi_t, dq, *seq_ptrs,
        *common, *_strides(dq, 3, varlen), *_strides(lse, 2, varlen), *scalars,
    )  # fmt: skip
    const = {"BLOCK_D": bd, "IEEE": ieee, "FEATURES": features}
    if INTERPRET:
        cfg = _config_kwargs(INTERPRET_CONFIG)
        dkdv_grid = (triton.cdiv(rows_k, cfg["BLOCK_N"]), n_seq * Hk)
        attention_bwd_dkdv_kernel[dkdv_grid](*dkdv_args, **const, ATOMIC_DQ=atomic, **cfg)
        if not atomic:
            dq_grid = (triton.cdiv(rows_q, cfg["BLOCK_M"]), n_seq * H)
            attention_bwd_dq_kernel[dq_grid](*dq_args, **const, **cfg)
    else:
        _DKDV_TUNED[(variant, bd)][lambda m: (triton.cdiv(rows_k, m["BLOCK_N"]), n_seq * Hk)](
            *dkdv_args, **const, ATOMIC_DQ=atomic
        )
        if not atomic:
            _DQ_TUNED[(variant, bd)][lambda m: (triton.cdiv(rows_q, m["BLOCK_M"]), n_seq * H)](
                *dq_args, **const
            )
    if atomic:
        dq.copy_(dq_acc)


# ---------------------------------------------------------------------------------------------
# AOT specs: every (kernel, dtype, BLOCK_D, tile config, FEATURES) the launchers can launch
# ---------------------------------------------------------------------------------------------

_TL = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
_FP32_ARGS = {"sm_scale", "softcap", "dropout_p"}
_I32_PTRS = {"CuSeqQ", "CuSeqK", "SeqlensK", "BatchIdx"}
_F32_PTRS = {"Bias", "Alibi", "Lse", "Delta", "DQAcc", "LsePart", "OutPart"}
_IO_PTRS = {"Q", "K", "V", "Out", "DO", "DOut", "DK", "DV", "DQ"}


def _arg_names(kernel) -> list[str]:
    while hasattr(kernel, "fn"):  # autotuner -> JITFunction/InterpretedFunction -> function
        kernel = kernel.fn
    return list(inspect.signature(kernel).parameters)


def _signature(kernel, dtype: torch.dtype, constexprs: dict, out_dtype=None) -> dict:
    sig = {}
    for name in _arg_names(kernel):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name == "Out":
            sig[name] = _TL[out_dtype or dtype]
        elif name in _IO_PTRS:
            sig[name] = _TL[dtype]
        elif name in _F32_PTRS:
            sig[name] = "*fp32"
        elif name in _I32_PTRS:
            sig[name] = "*i32"
        elif name in _FP32_ARGS:
            sig[name] = "fp32"
        elif name == "seed":
            sig[name] = "i64"
        else:
            sig[name] = "i32"
    return sig


def _spec(kernel, dtype, cfg, const, label, out_dtype=None) -> Spec:
    const = {**cfg.kwargs, **const}
    tile = f"m{cfg.kwargs['BLOCK_M']}n{cfg.kwargs['BLOCK_N']}w{cfg.num_warps}s{cfg.num_stages}"
    return Spec(
        kernel,
        _signature(kernel, dtype, const, out_dtype),
        const,
        cfg.num_warps,
        cfg.num_stages,
        f"{label} {str(dtype)[6:]} d{const['BLOCK_D']} {tile}",
    )


def _aot_specs() -> list[Spec]:
    specs = []
    for kernel, table, label in (
        (attention_fwd_kernel, FWD_CONFIGS, "fwd"),
        (attention_bwd_dkdv_kernel, DKDV_CONFIGS, "dkdv"),
        (attention_bwd_dq_kernel, DQ_CONFIGS, "dq"),
    ):
        for (variant, bd), cfgs in table.items():
            const = {"BLOCK_D": bd, "IEEE": False, "FEATURES": variant != "plain"}
            extra = [{}]
            if kernel is attention_bwd_dkdv_kernel:
                atomic = bd <= ATOMIC_DQ_MAX_BLOCK_D
                extra = [{"ATOMIC_DQ": False}] + ([{"ATOMIC_DQ": True}] if atomic else [])
            for more in extra:
                name = f"{label} {variant}" + (" atomic" if more.get("ATOMIC_DQ") else "")
                for dtype in (torch.float16, torch.bfloat16):
                    specs += [_spec(kernel, dtype, c, {**const, **more}, name) for c in cfgs]
    for (_, bd), cfg in DECODE_CONFIGS.items():
        const = {"BLOCK_D": bd, "IEEE": False, "FEATURES": True}
        for dtype in (torch.float16, torch.bfloat16):
            specs.append(_spec(attention_fwd_kernel, dtype, cfg, const, "decode", torch.float32))
    for bd in (32, 64, 128, 256):
        for dtype in (torch.float16, torch.bfloat16):
            specs.append(
                Spec(
                    attention_bwd_preprocess_kernel,
                    _signature(
                        attention_bwd_preprocess_kernel, dtype, {"BLOCK_M": 0, "BLOCK_D": 0}
                    ),
                    {"BLOCK_M": _pre_block_m(bd), "BLOCK_D": bd},
                    4,
                    1,
                    f"preprocess {str(dtype)[6:]} d{bd}",
                )
            )
            const = {"BLOCK_R": COMBINE_BLOCK_R, "BLOCK_D": bd}
            specs.append(
                Spec(
                    attention_combine_kernel,
                    _signature(attention_combine_kernel, dtype, const),
                    const,
                    4,
                    1,
                    f"combine {str(dtype)[6:]} d{bd}",
                )
            )
    return specs


AOT_SPECS = _aot_specs()
