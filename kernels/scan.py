"""Triton selective scan (Mamba): chunked parallel scan forward, reverse-scan backward, decode step.

One program owns one (batch row, channel) pair and walks L in tiles of BLOCK_L steps; the state
tile (BLOCK_L, N) lives in registers. Inside a tile the recurrence h_t = a_t h_{t-1} + b_t
(a = exp(delta' A), b = delta' B u) is an associative scan over affine maps (a, b), with the
carry from the previous tile folded into the first element; sequence starts (cu_seqlens) fold in
their initial state and cut the chain (a = 0). The backward walks chunks in reverse, recomputes
the forward states of each tile from the saved chunk states, and solves the adjoint recurrence
g_t = C_t dy_t + a_{t+1} g_{t+1} with a reverse associative scan of the same operator.

The launchers take exactly the arguments of the C++ kernel ops (csrc/dlcore.cpp); the contract is
in dlcore/ops/scan.py. Optional inputs become runtime flags (with a dummy pointer), so one compiled
variant per (dtype, BLOCK_N, BLOCK_L) serves every combination of D, z, delta_bias, softplus,
initial_state, cu_seqlens and constant/variable/grouped B and C.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .aot import Spec, max_registers

# Elements of one (BLOCK_L, BLOCK_N) tile per program, and per thread (registers: about 30 per
# element forward, 110 backward). Left alone, ptxas caps sm_90 code at 128 registers and
# spills; the launchers raise the cap to what the block size allows (aot.max_registers), and the
# backward tile keeps 8 warps so that cap is 255 (AOT reports: every variant spill-free).
_FWD_TILE = 1024
_BWD_TILE = 512
_FWD_PER_THREAD = 4
_BWD_PER_THREAD = 2
_MAX_BLOCK_L = 64
# The chunk size dlcore.ops.scan passes (CHUNK_SIZE); AOT_SPECS covers the tiles it dispatches.
_OPS_CHUNK_SIZE = 64
# Programs per (batch row, group) the deterministic backward splits a group's channels over.
_DET_SPLIT_TARGET = 512
_DET_SPLIT_MAX = 32


@triton.jit
def _affine_combine(a1, b1, a2, b2):
    # (a2, b2) after (a1, b1): x -> a2 (a1 x + b1) + b2. Triton calls combine(accumulated, next)
    # in both scan directions, so the same operator serves the reverse (adjoint) scan.
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _on(flag, like):
    """A runtime 0/1 flag as a boolean tensor shaped like ``like`` (for masks)."""
    return (tl.zeros_like(like) + flag) != 0


@triton.jit
def _softplus(x):
    # torch/mamba_ssm threshold 20. log1p(e^x) without tl.log1p: log(w) * y / (w - 1) with
    # w = 1 + y is accurate to a few ulps (Goldberg), where log(1 + y) loses y's low bits.
    y = tl.exp(tl.minimum(x, 20.0))
    w = 1.0 + y
    return tl.where(x > 20.0, x, tl.where(w == 1.0, y, tl.log(w) * (y / (w - 1.0))))


@triton.jit
def _kahan_add(acc, err, v):
    """acc + v with the rounding error kept in err (the sum is acc - err)."""
    y = v - err
    total = acc + y
    return total, (total - acc) - y


@triton.jit
def _softplus_grad(x):
    return tl.where(x > 20.0, 1.0, tl.sigmoid(x))


@triton.jit
def _seq_index(cu_ptr, t, nseq, search_steps):
    """Per position t: the largest s < nseq with cu[s] <= t (its packed sequence)."""
    lo = tl.zeros_like(t)
    hi = lo + nseq
    for _ in range(search_steps):
        mid = (lo + hi) // 2
        go_right = tl.load(cu_ptr + mid) <= t
        lo = tl.where(go_right, mid, lo)
        hi = tl.where(go_right, hi, mid)
    return lo


@triton.jit
def _discretise(u_row, dt_row, t, m, bias, softplus):
    u = tl.load(u_row + t, mask=m, other=0.0).to(tl.float32)
    x = tl.load(dt_row + t, mask=m, other=0.0).to(tl.float32) + bias
    dt = tl.where(softplus != 0, _softplus(x), x)
    return u, x, tl.where(m, dt, 0.0)


@triton.jit
def _load_bc(ptr, var_base, const_base, s_n, t, m, offs_n, mask_n, is_var,
             BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """B or C for the tile as (BLOCK_L, BLOCK_N) fp32: variable rows, or the constant row."""
    if is_var:
        v = tl.load(
            ptr + var_base + offs_n[None, :] * s_n + t[:, None],
            mask=m[:, None] & mask_n[None, :],
            other=0.0,
        ).to(tl.float32)
    else:
        row = tl.load(ptr + const_base + offs_n * s_n, mask=mask_n, other=0.0).to(tl.float32)
        v = tl.where(m[:, None], tl.broadcast_to(row[None, :], (BLOCK_L, BLOCK_N)), 0.0)
    return v


@triton.jit
def _forward_tile(u_row, dt_row, B_ptr, b_var_base, b_const_base, sB_n, b_var,
                  h0_ptr, cu_ptr, d, dim, N, nseq, search_steps, varlen, has_h0,
                  A2, bias, softplus, carry, t, m, offs_l, offs_n, mask_n,
                  BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """States h_t of one tile from the carry h_{t0-1}, and the pieces the backward reuses."""
    u, x, dt = _discretise(u_row, dt_row, t, m, bias, softplus)
    Bt = _load_bc(B_ptr, b_var_base, b_const_base, sB_n, t, m, offs_n, mask_n, b_var,
                  BLOCK_L, BLOCK_N)  # fmt: skip
    a = tl.exp2(dt[:, None] * A2[None, :])
    b = (dt * u)[:, None] * Bt
    first = offs_l == 0
    # h_{t-1} wherever it does not come from inside the tile: the carry, or a sequence's
    # initial state (zero without one).
    prev = tl.where(first[:, None], carry[None, :], 0.0)
    seq = _seq_index(cu_ptr, t, nseq, search_steps)
    is_start = offs_l < 0
    if varlen != 0:
        is_start = (t == tl.load(cu_ptr + seq, mask=m, other=-1)) & m
        h0 = tl.load(
            h0_ptr + (seq[:, None].to(tl.int64) * dim + d) * N + offs_n[None, :],
            mask=(is_start & _on(has_h0, t))[:, None] & mask_n[None, :],
            other=0.0,
        )
        prev = tl.where(is_start[:, None], h0, prev)
    cut = (first | is_start)[:, None]
    _, h = tl.associative_scan((tl.where(cut, 0.0, a), b + a * prev), 0, _affine_combine)
    return u, x, dt, Bt, a, b, prev, cut, h, seq, is_start


@triton.jit
def _last_row(h, offs_l, BLOCK_L: tl.constexpr):
    # Padded steps are identities (delta' = 0 gives a = 1, b = 0), so the last row is the state
    # after the last valid step.
    return tl.sum(tl.where((offs_l == BLOCK_L - 1)[:, None], h, 0.0), axis=0)


@triton.jit
def _chunk_start_state(cu_ptr, h0_ptr, d, dim, N, nseq, search_steps, varlen, has_h0, c_start,
                       carry, offs_n, mask_n):  # fmt: skip
    """The state before position c_start: ``carry``, or the initial state of a sequence starting
    there (what the backward restarts from)."""
    on = _on(varlen, offs_n)
    # Vectors of one repeated value: scalar control flow stays uniform in every backend.
    s = _seq_index(cu_ptr, tl.zeros_like(offs_n) + c_start, nseq, search_steps)
    starts_here = on & (tl.load(cu_ptr + s, mask=on, other=-1) == c_start)
    h0 = tl.load(h0_ptr + (s.to(tl.int64) * dim + d) * N + offs_n,
                 mask=mask_n & starts_here & _on(has_h0, offs_n), other=0.0)  # fmt: skip
    return tl.where(starts_here, h0, carry)


@triton.jit
def selective_scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dbias_ptr, h0_ptr, cu_ptr,
    out_ptr, last_ptr, cs_ptr,
    dim, L, N, chunk_size, nchunks, nseq, search_steps, dpg_b, dpg_c,
    su_b, su_d, sdt_b, sdt_d, sz_b, sz_d, so_b, so_d,
    sB_b, sB_g, sB_n, sC_b, sC_g, sC_n,
    b_var, c_var, has_d, has_z, has_dbias, softplus, has_h0, varlen,
    BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1).to(tl.int64)
    gb = d // dpg_b
    gc = d // dpg_c
    offs_l = tl.arange(0, BLOCK_L)
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    A2 = tl.load(A_ptr + d * N + offs_n, mask=mask_n, other=0.0) * 1.4426950408889634
    Dd = tl.load(D_ptr + d, mask=_on(has_d, d), other=0.0)
    bias = tl.load(dbias_ptr + d, mask=_on(has_dbias, d), other=0.0)
    u_row = u_ptr + pid_b * su_b + d * su_d
    dt_row = delta_ptr + pid_b * sdt_b + d * sdt_d
    z_row = z_ptr + pid_b * sz_b + d * sz_d
    o_row = out_ptr + pid_b * so_b + d * so_d
    row = pid_b * dim + d
    carry = tl.load(h0_ptr + row * N + offs_n, mask=mask_n & _on(has_h0, offs_n), other=0.0)
    for c in range(nchunks):
        c_start = c * chunk_size
        c_end = tl.minimum(c_start + chunk_size, L)
        carry = _chunk_start_state(cu_ptr, h0_ptr, d, dim, N, nseq, search_steps, varlen, has_h0,
                                   c_start, carry, offs_n, mask_n)  # fmt: skip
        tl.store(cs_ptr + (row * nchunks + c) * N + offs_n, carry, mask=mask_n)
        for s in range(0, chunk_size, BLOCK_L):
            t = c_start + s + offs_l
            m = t < c_end
            u, x, dt, Bt, a, b, prev, cut, h, seq, is_start = _forward_tile(
                u_row, dt_row, B_ptr, pid_b * sB_b + gb * sB_g, d * sB_g, sB_n, b_var,
                h0_ptr, cu_ptr, d, dim, N, nseq, search_steps, varlen, has_h0,
                A2, bias, softplus, carry, t, m, offs_l, offs_n, mask_n, BLOCK_L, BLOCK_N,
            )  # fmt: skip
            Ct = _load_bc(C_ptr, pid_b * sC_b + gc * sC_g, d * sC_g, sC_n, t, m, offs_n, mask_n,
                          c_var, BLOCK_L, BLOCK_N)  # fmt: skip
            y = tl.sum(h * Ct, axis=1) + Dd * u
            if has_z != 0:
                zz = tl.load(z_row + t, mask=m, other=0.0).to(tl.float32)
                y = y * zz * tl.sigmoid(zz)
            tl.store(o_row + t, y.to(out_ptr.dtype.element_ty), mask=m)
            if varlen != 0:
                ends = tl.load(cu_ptr + seq + 1, mask=m, other=-1)
                is_end = (t + 1 == ends) & m
                tl.store(
                    last_ptr + (seq[:, None].to(tl.int64) * dim + d) * N + offs_n[None, :],
                    h,
                    mask=is_end[:, None] & mask_n[None, :],
                )
            carry = _last_row(h, offs_l, BLOCK_L)
    if varlen == 0:
        tl.store(last_ptr + row * N + offs_n, carry, mask=mask_n)


@triton.jit
def selective_scan_bwd_kernel(
    dout_ptr, u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dbias_ptr, h0_ptr, cu_ptr,
    cs_ptr, dlast_ptr, scratch_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dh0_ptr, dA_part, dD_part, dbias_part,
    dim, L, N, chunk_size, nchunks, nseq, search_steps, dim_per_group, chans_per_prog,
    progs_per_group, dpg_b, dpg_c, max_tiles,
    sdo_b, sdo_d, su_b, su_d, sdt_b, sdt_d, sz_b, sz_d,
    sB_b, sB_g, sB_n, sC_b, sC_g, sC_n, sdB_b, sdB_g, sdB_n, sdC_b, sdC_g, sdC_n,
    b_var, c_var, has_d, has_z, has_dbias, softplus, has_h0, varlen, has_dlast,
    db_mode, dc_mode,
    BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One program per (batch row, run of channels inside one group of ``dim_per_group``).
    du/ddelta/dz are contiguous (batch, dim, L) fp32; dA/dD/ddelta_bias partials are per (batch
    row, channel), summed by the launcher. dB/dC modes: 0 constant: a (batch, dim, N) partial;
    1 variable, one channel per group: slot d; 2 variable shared by channels: atomic add into slot
    d // dpg; 3 deterministic: the program's own slot pid_x (read-modify-write across its
    channels), summed per group by the launcher."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_x = tl.program_id(1).to(tl.int64)
    g = pid_x // progs_per_group
    d_first = g * dim_per_group + (pid_x % progs_per_group) * chans_per_prog
    d_stop = tl.minimum(d_first + chans_per_prog, (g + 1) * dim_per_group)
    offs_l = tl.arange(0, BLOCK_L)
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    first = offs_l == 0
    rmw = chans_per_prog > 1
    # This program's scratch: the states entering each tile of a chunk, then one tile of states.
    scratch = scratch_ptr + (pid_b * tl.num_programs(1) + pid_x) * (max_tiles + BLOCK_L) * N
    rows_ptr = scratch + max_tiles * N
    for i in range(d_stop - d_first):
        d = d_first + i
        gb = d // dpg_b
        gc = d // dpg_c
        dB_slot = tl.where(db_mode == 1, d, tl.where(db_mode == 2, gb, pid_x))
        dC_slot = tl.where(dc_mode == 1, d, tl.where(dc_mode == 2, gc, pid_x))
        A = tl.load(A_ptr + d * N + offs_n, mask=mask_n, other=0.0)
        A2 = A * 1.4426950408889634
        Dd = tl.load(D_ptr + d, mask=_on(has_d, d), other=0.0)
        bias = tl.load(dbias_ptr + d, mask=_on(has_dbias, d), other=0.0)
        u_row = u_ptr + pid_b * su_b + d * su_d
        dt_row = delta_ptr + pid_b * sdt_b + d * sdt_d
        z_row = z_ptr + pid_b * sz_b + d * sz_d
        do_row = dout_ptr + pid_b * sdo_b + d * sdo_d
        row = pid_b * dim + d
        # g_{t+1} entering the current tile from the right (dlast_state at the very end).
        g_next = tl.load(
            dlast_ptr + row * N + offs_n,
            mask=mask_n & _on(has_dlast, offs_n) & ~_on(varlen, offs_n),
            other=0.0,
        )
        dh0 = tl.zeros([BLOCK_N], tl.float32)
        # Sums over L, compensated (Kahan): thousands of fp32 terms per channel.
        acc_dA = tl.zeros([BLOCK_N], tl.float32)
        acc_dB = tl.zeros([BLOCK_N], tl.float32)
        acc_dC = tl.zeros([BLOCK_N], tl.float32)
        acc_dD = tl.zeros([BLOCK_L], tl.float32)
        acc_dbias = tl.zeros([BLOCK_L], tl.float32)
        err_dA = tl.zeros([BLOCK_N], tl.float32)
        err_dB = tl.zeros([BLOCK_N], tl.float32)
        err_dC = tl.zeros([BLOCK_N], tl.float32)
        err_dD = tl.zeros([BLOCK_L], tl.float32)
        err_dbias = tl.zeros([BLOCK_L], tl.float32)
        for ci in range(nchunks):
            c = nchunks - 1 - ci
            c_start = c * chunk_size
            c_end = tl.minimum(c_start + chunk_size, L)
            ntiles = tl.cdiv(c_end - c_start, BLOCK_L)
            # Forward states entering each tile of the chunk, kept in this program's scratch
            # rows: one forward pass, then the tiles in reverse.
            tl.debug_barrier()
            carry = tl.load(cs_ptr + (row * nchunks + c) * N + offs_n, mask=mask_n, other=0.0)
            for s2 in range(ntiles - 1):
                tl.store(scratch + s2 * N + offs_n, carry, mask=mask_n)
                t = c_start + s2 * BLOCK_L + offs_l
                _, _, _, _, _, _, _, _, hs, _, _ = _forward_tile(
                    u_row, dt_row, B_ptr, pid_b * sB_b + gb * sB_g, d * sB_g, sB_n, b_var,
                    h0_ptr, cu_ptr, d, dim, N, nseq, search_steps, varlen, has_h0,
                    A2, bias, softplus, carry, t, t < c_end, offs_l, offs_n, mask_n,
                    BLOCK_L, BLOCK_N,
                )  # fmt: skip
                carry = _last_row(hs, offs_l, BLOCK_L)
            tl.store(scratch + (ntiles - 1) * N + offs_n, carry, mask=mask_n)
            tl.debug_barrier()
            for si in range(ntiles):
                s = ntiles - 1 - si
                carry = tl.load(scratch + s * N + offs_n, mask=mask_n, other=0.0)
                t = c_start + s * BLOCK_L + offs_l
                m = t < c_end
                u, x, dt, Bt, a, b, prev, cut, h, seq, is_start = _forward_tile(
                    u_row, dt_row, B_ptr, pid_b * sB_b + gb * sB_g, d * sB_g, sB_n, b_var,
                    h0_ptr, cu_ptr, d, dim, N, nseq, search_steps, varlen, has_h0,
                    A2, bias, softplus, carry, t, m, offs_l, offs_n, mask_n, BLOCK_L, BLOCK_N,
                )  # fmt: skip
                # h_{t-1}: the tile's states one row down (through the program's scratch rows;
                # h_t - b_t would cancel badly), or the carry / initial state at cut rows.
                tl.store(rows_ptr + offs_l[:, None] * N + offs_n[None, :], h,
                         mask=mask_n[None, :])  # fmt: skip
                tl.debug_barrier()
                h_prev = tl.load(
                    rows_ptr + (offs_l[:, None] - 1) * N + offs_n[None, :],
                    mask=(offs_l > 0)[:, None] & mask_n[None, :],
                    other=0.0,
                )
                tl.debug_barrier()
                ah = a * tl.where(cut, prev, h_prev)
                Ct = _load_bc(C_ptr, pid_b * sC_b + gc * sC_g, d * sC_g, sC_n, t, m, offs_n,
                              mask_n, c_var, BLOCK_L, BLOCK_N)  # fmt: skip
                dy = tl.load(do_row + t, mask=m, other=0.0).to(tl.float32)
                if has_z != 0:
                    zz = tl.load(z_row + t, mask=m, other=0.0).to(tl.float32)
                    sz = tl.sigmoid(zz)
                    y = tl.sum(h * Ct, axis=1) + Dd * u
                    tl.store(dz_ptr + row * L + t, dy * y * sz * (1.0 + zz * (1.0 - sz)), mask=m)
                    dy = dy * zz * sz
                # Adjoint g_t = C_t dy_t + a_{t+1} g_{t+1}; a_{t+1} from the next step's delta,
                # cut (0) where step t ends its sequence, and g_next enters at the tile's end.
                t1 = t + 1
                m1 = m & (t1 < L)
                x1 = tl.load(dt_row + t1, mask=m1, other=0.0).to(tl.float32) + bias
                dt1 = tl.where(m1, tl.where(softplus != 0, _softplus(x1), x1), 0.0)
                alpha = tl.exp2(dt1[:, None] * A2[None, :])
                beta = Ct * dy[:, None]
                if varlen != 0:
                    ends = tl.load(cu_ptr + seq + 1, mask=m, other=-1)
                    is_end = (t1 == ends) & m
                    alpha = tl.where(is_end[:, None], 0.0, alpha)
                    beta += tl.load(
                        dlast_ptr + (seq[:, None].to(tl.int64) * dim + d) * N + offs_n[None, :],
                        mask=(is_end & _on(has_dlast, t))[:, None] & mask_n[None, :],
                        other=0.0,
                    )
                tile_end = (offs_l == BLOCK_L - 1)[:, None]
                beta = tl.where(tile_end, beta + alpha * g_next[None, :], beta)
                alpha = tl.where(tile_end, 0.0, alpha)
                _, gt = tl.associative_scan((alpha, beta), 0, _affine_combine, reverse=True)
                g_next = tl.sum(tl.where(first[:, None], gt, 0.0), axis=0)
                # dL/dh_{t-1} through step t: the initial state's gradient at sequence starts.
                ga = gt * a
                dh0 = tl.sum(tl.where(first[:, None], ga, 0.0), axis=0)
                if varlen != 0:
                    tl.store(
                        dh0_ptr + (seq[:, None].to(tl.int64) * dim + d) * N + offs_n[None, :],
                        ga,
                        mask=(is_start & _on(has_h0, t))[:, None] & mask_n[None, :],
                    )
                gB = tl.sum(gt * Bt, axis=1)
                gah = gt * ah
                du = dt * gB + Dd * dy
                ddt = u * gB + tl.sum(gah * A[None, :], axis=1)
                dx = tl.where(m, tl.where(softplus != 0, ddt * _softplus_grad(x), ddt), 0.0)
                tl.store(du_ptr + row * L + t, du, mask=m)
                tl.store(ddelta_ptr + row * L + t, dx, mask=m)
                acc_dA, err_dA = _kahan_add(acc_dA, err_dA, tl.sum(gah * dt[:, None], axis=0))
                acc_dD, err_dD = _kahan_add(acc_dD, err_dD, dy * u)
                acc_dbias, err_dbias = _kahan_add(acc_dbias, err_dbias, dx)
                dBt = gt * (dt * u)[:, None]
                dCt = dy[:, None] * h
                tile_mask = m[:, None] & mask_n[None, :]
                if db_mode == 0:
                    acc_dB, err_dB = _kahan_add(acc_dB, err_dB, tl.sum(dBt, axis=0))
                else:
                    p = dB_ptr + pid_b * sdB_b + dB_slot * sdB_g + offs_n[None, :] * sdB_n
                    p += t[:, None]
                    if db_mode == 2:
                        tl.atomic_add(p, dBt, mask=tile_mask, sem="relaxed")
                    else:
                        if rmw & (db_mode == 3):
                            dBt += tl.load(p, mask=tile_mask, other=0.0)
                        tl.store(p, dBt, mask=tile_mask)
                if dc_mode == 0:
                    acc_dC, err_dC = _kahan_add(acc_dC, err_dC, tl.sum(dCt, axis=0))
                else:
                    p = dC_ptr + pid_b * sdC_b + dC_slot * sdC_g + offs_n[None, :] * sdC_n
                    p += t[:, None]
                    if dc_mode == 2:
                        tl.atomic_add(p, dCt, mask=tile_mask, sem="relaxed")
                    else:
                        if rmw & (dc_mode == 3):
                            dCt += tl.load(p, mask=tile_mask, other=0.0)
                        tl.store(p, dCt, mask=tile_mask)
        if varlen == 0:
            tl.store(dh0_ptr + row * N + offs_n, dh0, mask=mask_n & _on(has_h0, offs_n))
        tl.store(dA_part + row * N + offs_n, acc_dA - err_dA, mask=mask_n)
        tl.store(dD_part + row, tl.sum(acc_dD - err_dD, axis=0))
        tl.store(dbias_part + row, tl.sum(acc_dbias - err_dbias, axis=0))
        if db_mode == 0:
            tl.store(dB_ptr + row * N + offs_n, acc_dB - err_dB, mask=mask_n)
        if dc_mode == 0:
            tl.store(dC_ptr + row * N + offs_n, acc_dC - err_dC, mask=mask_n)
        # The next channel of this program re-reads the dB/dC slots it just wrote.
        tl.debug_barrier()


@triton.jit
def selective_state_update_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dtb_ptr, out_ptr,
    dim, N, dpg_b, dpg_c,
    sst_b, sst_d, sx_b, sx_d, sdt_b, sdt_d, sB_b, sB_g, sC_b, sC_g, sz_b, sz_d, so_b, so_d,
    has_d, has_z, has_dtb, softplus,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = d < dim
    mask = mask_d[:, None] & (offs_n < N)[None, :]
    gb = d // dpg_b
    gc = d // dpg_c
    x = tl.load(x_ptr + pid_b * sx_b + d * sx_d, mask=mask_d, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + pid_b * sdt_b + d * sdt_d, mask=mask_d, other=0.0).to(tl.float32)
    dt += tl.load(dtb_ptr + d, mask=mask_d & _on(has_dtb, d), other=0.0)
    dt = tl.where(softplus != 0, _softplus(dt), dt)
    A = tl.load(A_ptr + d[:, None] * N + offs_n[None, :], mask=mask, other=0.0)
    Bv = tl.load(B_ptr + pid_b * sB_b + gb[:, None] * sB_g + offs_n[None, :], mask=mask, other=0.0)
    Cv = tl.load(C_ptr + pid_b * sC_b + gc[:, None] * sC_g + offs_n[None, :], mask=mask, other=0.0)
    st_ptrs = state_ptr + pid_b * sst_b + d[:, None] * sst_d + offs_n[None, :]
    h = tl.load(st_ptrs, mask=mask, other=0.0)
    h = tl.exp2(dt[:, None] * A * 1.4426950408889634) * h + (dt * x)[:, None] * Bv.to(tl.float32)
    tl.store(st_ptrs, h, mask=mask)
    y = tl.sum(h * Cv.to(tl.float32), axis=1)
    y += tl.load(D_ptr + d, mask=mask_d & _on(has_d, d), other=0.0) * x
    if has_z != 0:
        zz = tl.load(z_ptr + pid_b * sz_b + d * sz_d, mask=mask_d, other=0.0).to(tl.float32)
        y = y * zz * tl.sigmoid(zz)
    tl.store(out_ptr + pid_b * so_b + d * so_d, y.to(out_ptr.dtype.element_ty), mask=mask_d)


# ---------------------------------------------------------------- launchers


def block_n(n: int) -> int:
    return triton.next_power_of_2(n)


def block_l(n: int, chunk_size: int, tile: int = _FWD_TILE) -> int:
    """Steps per tile: the register budget over the padded state size, at most the chunk."""
    cap = max(1, min(_MAX_BLOCK_L, tile // block_n(n)))
    return min(cap, triton.next_power_of_2(chunk_size))


def _warps(block_l_: int, block_n_: int, per_thread: int) -> int:
    return max(1, min(16, block_l_ * block_n_ // (32 * per_thread)))


def _bc_strides(M: torch.Tensor) -> tuple[int, int, int, int]:
    """(is_var, batch stride, group-or-channel stride, N stride) of B or C."""
    if M.dim() == 2:
        return 0, 0, M.stride(0), M.stride(1)
    return 1, M.stride(0), M.stride(1), M.stride(2)


def _dim_per_group(M: torch.Tensor, dim: int) -> int:
    """Channels per group of a variable B/C; 1 for a constant one (each channel its own row)."""
    return dim // M.shape[1] if M.dim() == 4 else 1


def _varlen_args(cu_seqlens: torch.Tensor | None, dummy_i32: torch.Tensor):
    if cu_seqlens is None:
        return dummy_i32, 1, 0, 0
    nseq = cu_seqlens.shape[0] - 1
    return cu_seqlens, nseq, max(1, math.ceil(math.log2(nseq))) if nseq > 1 else 0, 1


def _check_dense(name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous buffer, got strides {t.stride()}")


def selective_scan_fwd(
    u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens, delta_softplus, chunk_size,
    out, last_state, chunk_states,
) -> None:  # fmt: skip
    """Writes out, last_state and chunk_states (the kernel contract in dlcore/ops/scan.py)."""
    batch, dim, length = u.shape
    n = A.shape[1]
    for name, t in (("last_state", last_state), ("chunk_states", chunk_states)):
        _check_dense(name, t)
    A = A.contiguous()
    h0 = initial_state.contiguous() if initial_state is not None else None
    dummy = A
    cu, nseq, steps, varlen = _varlen_args(cu_seqlens, torch.zeros(1, dtype=torch.int32,
                                                                   device=u.device))  # fmt: skip
    if varlen:
        # Empty sequences take no step: their last state is their initial state.
        if h0 is not None:
            last_state.copy_(h0)
        else:
            last_state.zero_()
    nchunks = chunk_states.shape[2]
    b_var, sBb, sBg, sBn = _bc_strides(B)
    c_var, sCb, sCg, sCn = _bc_strides(C)
    zz = z if z is not None else u
    bn = block_n(n)
    bl = block_l(n, chunk_size)
    selective_scan_fwd_kernel[(batch, dim)](
        u, delta, A, B, C, D if D is not None else dummy, zz,
        delta_bias if delta_bias is not None else dummy, h0 if h0 is not None else dummy, cu,
        out, last_state, chunk_states,
        dim, length, n, chunk_size, nchunks, nseq, steps, _dim_per_group(B, dim),
        _dim_per_group(C, dim), u.stride(0), u.stride(1), delta.stride(0), delta.stride(1),
        zz.stride(0), zz.stride(1), out.stride(0), out.stride(1), sBb, sBg, sBn, sCb, sCg, sCn,
        b_var, c_var, int(D is not None), int(z is not None), int(delta_bias is not None),
        int(bool(delta_softplus)), int(h0 is not None), varlen,
        BLOCK_L=bl, BLOCK_N=bn, num_warps=_warps(bl, bn, _FWD_PER_THREAD),
        maxnreg=max_registers(_warps(bl, bn, _FWD_PER_THREAD)),
    )  # fmt: skip


def _deterministic_split(batch: int, groups: int, dim_per_group: int) -> int:
    """Programs per (row, group) for the deterministic variable dB/dC: enough programs to fill a
    GPU, each looping over its run of channels, with one partial slot per program."""
    want = max(1, _DET_SPLIT_TARGET // max(1, batch * groups))
    return max(1, min(dim_per_group, want, _DET_SPLIT_MAX))


def selective_scan_bwd(
    dout, u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens, delta_softplus,
    chunk_size, chunk_states, dlast_state, deterministic, du, ddelta, dA, dB, dC, dD, dz,
    ddelta_bias, dinitial_state,
) -> None:  # fmt: skip
    """Writes every gradient buffer given (the kernel contract in dlcore/ops/scan.py)."""
    batch, dim, length = u.shape
    n = A.shape[1]
    dev = u.device
    f32 = torch.float32
    for name, t in (("du", du), ("ddelta", ddelta), ("dA", dA), ("dB", dB), ("dC", dC),
                    ("dz", dz), ("dinitial_state", dinitial_state)):  # fmt: skip
        if t is not None:
            _check_dense(name, t)
    A = A.contiguous()
    h0 = initial_state.contiguous() if initial_state is not None else None
    dlast = dlast_state.contiguous() if dlast_state is not None else None
    chunk_states = chunk_states.contiguous()
    dummy = A
    cu, nseq, steps, varlen = _varlen_args(cu_seqlens, torch.zeros(1, dtype=torch.int32,
                                                                   device=dev))  # fmt: skip
    if varlen and dinitial_state is not None:
        # An empty sequence's initial state is its last state.
        if dlast is not None:
            dinitial_state.copy_(dlast)
        else:
            dinitial_state.zero_()
    nchunks = chunk_states.shape[2]
    b_var, sBb, sBg, sBn = _bc_strides(B)
    c_var, sCb, sCg, sCn = _bc_strides(C)
    dpg_b, dpg_c = _dim_per_group(B, dim), _dim_per_group(C, dim)
    # Channels are split into runs that never cross a B or a C group.
    groups = math.lcm(dim // dpg_b if b_var else 1, dim // dpg_c if c_var else 1)
    dpg = dim // groups
    shared_b, shared_c = b_var and dpg_b > 1, c_var and dpg_c > 1
    if deterministic and (shared_b or shared_c):
        split = _deterministic_split(batch, groups, dpg)
        chans = math.ceil(dpg / split)
        split = math.ceil(dpg / chans)
    else:
        split, chans = dpg, 1
    nprog = groups * split
    finish = []

    def target(M, dM):
        """(buffer, mode) of dB or dC, see selective_scan_bwd_kernel."""
        if M.dim() == 2:
            part = torch.empty(batch, dim, n, dtype=f32, device=dev)
            finish.append(lambda: dM.copy_(part.sum(0)))
            return part, 0
        if M.shape[1] == dim:
            return dM, 1
        if not deterministic:
            dM.zero_()
            return dM, 2
        part = torch.zeros(batch, nprog, n, length, dtype=f32, device=dev)
        g = M.shape[1]
        finish.append(lambda: dM.copy_(part.view(batch, g, nprog // g, n, length).sum(2)))
        return part, 3

    dB_buf, db_mode = target(B, dB)
    dC_buf, dc_mode = target(C, dC)
    dA_part = torch.empty(batch, dim, n, dtype=f32, device=dev)
    dD_part = torch.empty(batch, dim, dtype=f32, device=dev)
    dbias_part = torch.empty(batch, dim, dtype=f32, device=dev)
    dz_buf = dz if dz is not None else dummy
    dh0_buf = dinitial_state if dinitial_state is not None else dummy
    zz = z if z is not None else u
    sdB = (dB_buf.stride(0), dB_buf.stride(1), dB_buf.stride(2)) if db_mode else (0, 0, 0)
    sdC = (dC_buf.stride(0), dC_buf.stride(1), dC_buf.stride(2)) if dc_mode else (0, 0, 0)
    bn = block_n(n)
    bl = block_l(n, chunk_size, _BWD_TILE)
    max_tiles = triton.cdiv(chunk_size, bl)
    scratch = torch.empty(batch, nprog, max_tiles + bl, n, dtype=f32, device=dev)
    selective_scan_bwd_kernel[(batch, nprog)](
        dout, u, delta, A, B, C, D if D is not None else dummy, zz,
        delta_bias if delta_bias is not None else dummy, h0 if h0 is not None else dummy, cu,
        chunk_states, dlast if dlast is not None else dummy, scratch,
        du, ddelta, dz_buf, dB_buf, dC_buf, dh0_buf, dA_part, dD_part, dbias_part,
        dim, length, n, chunk_size, nchunks, nseq, steps, dpg, chans, split, dpg_b, dpg_c,
        max_tiles,
        dout.stride(0), dout.stride(1), u.stride(0), u.stride(1), delta.stride(0),
        delta.stride(1), zz.stride(0), zz.stride(1),
        sBb, sBg, sBn, sCb, sCg, sCn, *sdB, *sdC,
        b_var, c_var, int(D is not None), int(z is not None), int(delta_bias is not None),
        int(bool(delta_softplus)), int(h0 is not None), varlen, int(dlast is not None),
        db_mode, dc_mode,
        BLOCK_L=bl, BLOCK_N=bn, num_warps=_warps(bl, bn, _BWD_PER_THREAD),
        maxnreg=max_registers(_warps(bl, bn, _BWD_PER_THREAD)),
    )  # fmt: skip
    # Fixed-order sums over batch rows and channel runs (torch's reductions are deterministic).
    for fin in finish:
        fin()
    dA.copy_(dA_part.sum(0))
    if dD is not None:
        dD.copy_(dD_part.sum(0))
    if ddelta_bias is not None:
        ddelta_bias.copy_(dbias_part.sum(0))


def _update_block_d(n: int) -> int:
    return max(1, min(64, 1024 // block_n(n)))


def selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, out) -> None:
    """One decode step: updates ``state`` in place and writes ``out``."""
    batch, dim, n = state.shape
    A = A.contiguous()
    if B.dim() == 2:
        B = B.unsqueeze(1)
    if C.dim() == 2:
        C = C.unsqueeze(1)
    if B.stride(-1) != 1:
        B = B.contiguous()
    if C.stride(-1) != 1:
        C = C.contiguous()
    dummy = A
    zz = z if z is not None else x
    bd = _update_block_d(n)
    bn = block_n(n)
    selective_state_update_kernel[(batch, triton.cdiv(dim, bd))](
        state, x, dt, A, B, C, D if D is not None else dummy, zz,
        dt_bias if dt_bias is not None else dummy, out,
        dim, n, dim // B.shape[1], dim // C.shape[1],
        state.stride(0), state.stride(1), x.stride(0), x.stride(1), dt.stride(0), dt.stride(1),
        B.stride(0), B.stride(1), C.stride(0), C.stride(1), zz.stride(0), zz.stride(1),
        out.stride(0), out.stride(1),
        int(D is not None), int(z is not None), int(dt_bias is not None), int(bool(dt_softplus)),
        BLOCK_D=bd, BLOCK_N=bn, num_warps=4,
    )  # fmt: skip


# ---------------------------------------------------------------- ahead-of-time variants

_FLOAT_SIG = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}


def _signature(kernel, typed: dict[str, str], constexprs: tuple[str, ...]) -> dict[str, str]:
    """Pointer args as given in ``typed``, constexprs, every other arg an i32 scalar."""
    return {a: typed.get(a, "constexpr" if a in constexprs else "i32") for a in kernel.arg_names}


def _aot_specs() -> list[Spec]:
    specs = []
    for dtype, io in _FLOAT_SIG.items():
        name = str(dtype).replace("torch.", "")
        for n in (2**k for k in range(9)):
            bn = block_n(n)
            fwd_ptrs = dict.fromkeys(("u_ptr", "delta_ptr", "B_ptr", "C_ptr", "z_ptr"), io)
            fwd_ptrs.update(out_ptr=io, cu_ptr="*i32")
            for p in ("A_ptr", "D_ptr", "dbias_ptr", "h0_ptr", "last_ptr", "cs_ptr"):
                fwd_ptrs[p] = "*fp32"
            bl = block_l(n, _OPS_CHUNK_SIZE)
            specs.append(Spec(
                selective_scan_fwd_kernel,
                _signature(selective_scan_fwd_kernel, fwd_ptrs, ("BLOCK_L", "BLOCK_N")),
                {"BLOCK_L": bl, "BLOCK_N": bn},
                num_warps=_warps(bl, bn, _FWD_PER_THREAD),
                maxnreg=max_registers(_warps(bl, bn, _FWD_PER_THREAD)),
                label=f"{name} N<={bn} L-tile {bl}",
            ))  # fmt: skip
            bwd_ptrs = {k: v for k, v in fwd_ptrs.items() if k not in ("out_ptr", "last_ptr")}
            bwd_ptrs["dout_ptr"] = io
            for p in ("dlast_ptr", "scratch_ptr", "du_ptr", "ddelta_ptr", "dz_ptr", "dB_ptr",
                      "dC_ptr", "dh0_ptr", "dA_part", "dD_part", "dbias_part"):  # fmt: skip
                bwd_ptrs[p] = "*fp32"
            bl = block_l(n, _OPS_CHUNK_SIZE, _BWD_TILE)
            specs.append(Spec(
                selective_scan_bwd_kernel,
                _signature(selective_scan_bwd_kernel, bwd_ptrs, ("BLOCK_L", "BLOCK_N")),
                {"BLOCK_L": bl, "BLOCK_N": bn},
                num_warps=_warps(bl, bn, _BWD_PER_THREAD),
                maxnreg=max_registers(_warps(bl, bn, _BWD_PER_THREAD)),
                label=f"{name} N<={bn} L-tile {bl}",
            ))  # fmt: skip
            upd_ptrs = dict.fromkeys(("x_ptr", "dt_ptr", "B_ptr", "C_ptr", "z_ptr", "out_ptr"), io)
            for p in ("state_ptr", "A_ptr", "D_ptr", "dtb_ptr"):
                upd_ptrs[p] = "*fp32"
            bd = _update_block_d(n)
            specs.append(Spec(
                selective_state_update_kernel,
                _signature(selective_state_update_kernel, upd_ptrs, ("BLOCK_D", "BLOCK_N")),
                {"BLOCK_D": bd, "BLOCK_N": bn},
                num_warps=4,
                label=f"{name} N<={bn} D-tile {bd}",
            ))  # fmt: skip
    return specs


# Every (kernel, dtype, tile) the launchers dispatch to with the ops layer's chunk size, for
# inputs of one dtype (mixed-dtype inputs compile the same code with other pointer types).
AOT_SPECS = _aot_specs()
