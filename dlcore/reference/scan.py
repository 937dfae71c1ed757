"""Eager selective-scan references: the executable specification of dlcore's scan ops.

The loop formulation of Mamba's selective state space model, one step per time index, in the
inputs' precision promoted to at least float32 (float64 inputs run in float64; fp16/bf16 inputs
are read as they are and accumulated in float32, as mamba_ssm's reference does). Shapes follow
``mamba_ssm.selective_scan_fn``::

    u, delta, z: (batch, dim, L)      A: (dim, N) real
    B, C: (dim, N) constant, (batch, N, L) variable, or (batch, G, N, L) grouped (dim % G == 0,
          channel d uses group d // (dim // G))
    D, delta_bias: (dim,)             initial_state: (batch, dim, N), or (nseq, dim, N) with
                                      cu_seqlens (int (nseq + 1,), batch == 1, packed sequences)

    delta' = softplus(delta + delta_bias)  if delta_softplus else  delta + delta_bias
             (softplus(x) = x for x > 20, else log1p(exp(x)), torch's default threshold)
    h_t = exp(delta'_t * A) * h_{t-1} + delta'_t * B_t * u_t          h_{-1} = initial_state or 0
    y_t = <C_t, h_t> + D * u_t;   out = y * silu(z) when z is given, in u's dtype

With ``cu_seqlens`` the state restarts at every sequence boundary (from ``initial_state[s]``), and
the last state has one row per sequence. Everything is differentiable by autograd, including
``initial_state``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _promote_all(dtypes: list[torch.dtype]) -> torch.dtype:
    out = torch.float32
    for d in dtypes:
        out = torch.promote_types(out, d)
    return out


def _per_channel(M: torch.Tensor, batch: int, dim: int, wdtype: torch.dtype) -> torch.Tensor:
    """B or C as (batch, dim, N, L) (a view for grouped inputs), or (1, dim, N, 1) if constant."""
    if M.dim() == 2:
        return M.to(wdtype)[None, :, :, None]
    if M.dim() == 3:
        M = M.unsqueeze(1)
    groups = M.shape[1]
    return M.to(wdtype).repeat_interleave(dim // groups, dim=1).expand(batch, dim, *M.shape[2:])


def _scan_loop(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    h: torch.Tensor,
    chunk_size: int = 0,
    offset: int = 0,
    chunk_states: list | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y (batch, dim, L) and the final state; B, C as (batch|1, dim, N, L|1), delta discretised.
    With ``chunk_size``, appends to ``chunk_states`` the state before every step whose packed
    position (``offset`` + t) is a multiple of ``chunk_size``."""
    ys = []
    for t in range(u.shape[-1]):
        if chunk_size and (offset + t) % chunk_size == 0:
            chunk_states.append(h)
        bt = B[..., t if B.shape[-1] > 1 else 0]
        ct = C[..., t if C.shape[-1] > 1 else 0]
        dt = delta[:, :, t, None]
        h = torch.exp(dt * A) * h + dt * bt * u[:, :, t, None]
        ys.append((h * ct).sum(-1))
    return (torch.stack(ys, dim=-1) if ys else u.new_zeros(u.shape)), h


def selective_scan_chunked_reference(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(out, last_state, chunk_states): the kernel contract's three outputs. ``chunk_states``
    (batch, dim, ceil(L / chunk_size), N) holds the state before the first step of every chunk
    of ``chunk_size`` packed positions (at a sequence start: that sequence's initial state), or
    is None when ``chunk_size`` is 0."""
    if A.is_complex():
        raise ValueError("complex A is not supported by dlcore's selective scan")
    wdtype = _promote_all(
        [t.dtype for t in (u, delta, A, B, C, D, z, delta_bias, initial_state) if t is not None]
    )
    batch, dim, length = u.shape
    uw = u.to(wdtype)
    dw = delta.to(wdtype)
    if delta_bias is not None:
        dw = dw + delta_bias.to(wdtype)[:, None]
    if delta_softplus:
        dw = F.softplus(dw)
    Aw = A.to(wdtype)
    Bw = _per_channel(B, batch, dim, wdtype)
    Cw = _per_channel(C, batch, dim, wdtype)
    n = A.shape[-1]
    states: list[torch.Tensor] = []

    if cu_seqlens is None:
        h0 = (
            initial_state.to(wdtype)
            if initial_state is not None
            else torch.zeros(batch, dim, n, dtype=wdtype, device=u.device)
        )
        y, last = _scan_loop(uw, dw, Aw, Bw, Cw, h0, chunk_size, 0, states)
    else:
        bounds = [int(b) for b in cu_seqlens.tolist()]
        ys, lasts = [], []
        for s, (start, end) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            h0 = (
                initial_state[s : s + 1].to(wdtype)
                if initial_state is not None
                else torch.zeros(1, dim, n, dtype=wdtype, device=u.device)
            )
            sl = slice(start, end)
            ys_s, last_s = _scan_loop(
                uw[..., sl],
                dw[..., sl],
                Aw,
                Bw if Bw.shape[-1] == 1 else Bw[..., sl],
                Cw if Cw.shape[-1] == 1 else Cw[..., sl],
                h0,
                chunk_size,
                start,
                states,
            )
            ys.append(ys_s)
            lasts.append(last_s)
        y = torch.cat(ys, dim=-1)
        last = torch.cat(lasts, dim=0)

    if D is not None:
        y = y + D.to(wdtype)[:, None] * uw
    if z is not None:
        y = y * F.silu(z.to(wdtype))
    chunk_states = torch.stack(states, dim=2) if chunk_size else None
    return y.to(u.dtype), last, chunk_states


def selective_scan_reference(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``mamba_ssm.selective_scan_fn`` semantics plus initial_state and cu_seqlens (see module
    docstring). Returns out (u's dtype) and, when asked, the last state (compute dtype)."""
    out, last, _ = selective_scan_chunked_reference(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, cu_seqlens
    )
    return (out, last) if return_last_state else out


def selective_state_update_reference(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
) -> torch.Tensor:
    """One decode step: updates ``state`` (batch, dim, N) in place and returns out (batch, dim)
    in x's dtype. x, dt, z: (batch, dim); B, C: (batch, N) or grouped (batch, G, N)."""
    if A.is_complex():
        raise ValueError("complex A is not supported by dlcore's selective_state_update")
    wdtype = _promote_all(
        [t.dtype for t in (state, x, dt, A, B, C, D, z, dt_bias) if t is not None]
    )
    dim = x.shape[1]
    dtw = dt.to(wdtype)
    if dt_bias is not None:
        dtw = dtw + dt_bias.to(wdtype)
    if dt_softplus:
        dtw = F.softplus(dtw)
    Bw = B.to(wdtype) if B.dim() == 3 else B.to(wdtype)[:, None]
    Cw = C.to(wdtype) if C.dim() == 3 else C.to(wdtype)[:, None]
    Bw = Bw.repeat_interleave(dim // Bw.shape[1], dim=1)
    Cw = Cw.repeat_interleave(dim // Cw.shape[1], dim=1)
    xw = x.to(wdtype)
    h = torch.exp(dtw[..., None] * A.to(wdtype)) * state.to(wdtype) + (dtw * xw)[..., None] * Bw
    state.copy_(h.to(state.dtype))
    y = (h * Cw).sum(-1)
    if D is not None:
        y = y + D.to(wdtype) * xw
    if z is not None:
        y = y * F.silu(z.to(wdtype))
    return y.to(x.dtype)
