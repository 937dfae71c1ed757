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


def _stepper(M: torch.Tensor, dim: int, wdtype: torch.dtype):
    """t -> B_t (or C_t) broadcastable against the (batch, dim, N) state. Steps are stored
    first and contiguous, and a single group broadcasts instead of being repeated per channel."""
    if M.dim() == 2:
        const = M.to(wdtype)[None]
        return lambda t: const
    steps = (M.unsqueeze(1) if M.dim() == 3 else M).to(wdtype).permute(3, 0, 1, 2).contiguous()
    groups = steps.shape[2]
    if groups == 1:
        return lambda t: steps[t]
    return lambda t: steps[t].repeat_interleave(dim // groups, dim=1)


def _scan_loop(u, delta, A, B_at, C_at, h, offset=0, chunk_size=0, chunk_states=None):
    """y (batch, dim, L) and the final state of steps ``offset .. offset + L`` of the packed
    sequence (u, delta: those steps; delta discretised; B_at, C_at from ``_stepper``). With
    ``chunk_size``, appends to ``chunk_states`` the state before every step whose packed
    position is a multiple of ``chunk_size``."""
    ys = []
    for t in range(u.shape[-1]):
        if chunk_size and (offset + t) % chunk_size == 0:
            chunk_states.append(h)
        dt = delta[:, :, t, None]
        h = torch.exp(dt * A) * h + dt * B_at(offset + t) * u[:, :, t, None]
        ys.append((h * C_at(offset + t)).sum(-1))
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
    B_at, C_at = _stepper(B, dim, wdtype), _stepper(C, dim, wdtype)
    n = A.shape[-1]
    states: list[torch.Tensor] = []

    if cu_seqlens is None:
        h0 = (
            initial_state.to(wdtype)
            if initial_state is not None
            else torch.zeros(batch, dim, n, dtype=wdtype, device=u.device)
        )
        y, last = _scan_loop(uw, dw, Aw, B_at, C_at, h0, 0, chunk_size, states)
    else:
        bounds = [int(b) for b in cu_seqlens.tolist()]
        ys, lasts = [], []
        for s, (start, end) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            h0 = (
                initial_state[s : s + 1].to(wdtype)
                if initial_state is not None
                else torch.zeros(1, dim, n, dtype=wdtype, device=u.device)
            )
            ys_s, last_s = _scan_loop(
                uw[..., start:end], dw[..., start:end], Aw, B_at, C_at, h0, start, chunk_size,
                states,
            )  # fmt: skip
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


def _to_layout(dM: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """Per-channel gradient (batch, dim, N, L) summed back into B's or C's own layout."""
    if M.dim() == 2:
        return dM.sum(dim=(0, 3))
    batch, dim, n, length = dM.shape
    groups = 1 if M.dim() == 3 else M.shape[1]
    summed = dM.view(batch, groups, dim // groups, n, length).sum(2)
    return summed.squeeze(1) if M.dim() == 3 else summed


def _steps(M: torch.Tensor, sl: slice) -> torch.Tensor:
    """Steps ``sl`` of a per-channel B or C (constant ones have a single step)."""
    return M if M.shape[-1] == 1 else M[..., sl]


def _scan_backward_loop(dout, dlast, u, dt, A, B, C, h0, D, z):
    """Adjoint of ``_scan_loop`` (plus D and the gate) for one run of steps; B, C per channel
    (batch|1, dim, N, L|1). Returns du, ddt, dA, dB, dC (per channel), dD, dz, dh0."""
    length = u.shape[-1]
    hs, h = [], h0
    for t in range(length):
        h = (
            torch.exp(dt[:, :, t, None] * A) * h
            + (dt[:, :, t] * u[:, :, t])[..., None] * B[..., t if B.shape[-1] > 1 else 0]
        )
        hs.append(h)
    dh = torch.zeros_like(h0) if dlast is None else dlast.clone()
    du, ddt, dz = torch.zeros_like(u), torch.zeros_like(u), torch.zeros_like(u)
    dB = torch.zeros(*h0.shape, length, dtype=u.dtype, device=u.device)
    dC = torch.zeros_like(dB)
    dA = torch.zeros_like(A)
    dD = torch.zeros(u.shape[1], dtype=u.dtype, device=u.device)
    for t in reversed(range(length)):
        bt = B[..., t if B.shape[-1] > 1 else 0]
        ct = C[..., t if C.shape[-1] > 1 else 0]
        h, hp = hs[t], hs[t - 1] if t > 0 else h0
        g = dout[:, :, t]
        if z is not None:
            y = (h * ct).sum(-1) + (D * u[:, :, t] if D is not None else 0)
            s = torch.sigmoid(z[:, :, t])
            dz[:, :, t] = g * y * s * (1 + z[:, :, t] * (1 - s))
            g = g * z[:, :, t] * s
        if D is not None:
            dD += (g * u[:, :, t]).sum(0)
            du[:, :, t] = g * D
        dh = dh + g[..., None] * ct
        dC[..., t] = g[..., None] * h
        a = torch.exp(dt[:, :, t, None] * A)
        dB[..., t] = dh * (dt[:, :, t] * u[:, :, t])[..., None]
        du[:, :, t] += dt[:, :, t] * (dh * bt).sum(-1)
        ddt[:, :, t] = (dh * (A * a * hp + u[:, :, t, None] * bt)).sum(-1)
        dA += (dh * dt[:, :, t, None] * a * hp).sum(0)
        dh = a * dh
    return du, ddt, dA, dB, dC, dD, dz, dh


def selective_scan_backward_reference(
    dout: torch.Tensor,
    dlast_state: torch.Tensor | None,
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
) -> tuple[torch.Tensor | None, ...]:
    """The hand-written reverse scan: gradients (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias,
    dinitial_state) of ``<dout, out> + <dlast_state, last_state>``, each shaped like its input
    (None for absent inputs), in the compute dtype. The spec of the kernels' backward; the tests
    check it against autograd through ``selective_scan_reference``."""
    wdtype = _promote_all(
        [t.dtype for t in (u, delta, A, B, C, D, z, delta_bias, initial_state) if t is not None]
    )
    batch, dim, length = u.shape
    n = A.shape[-1]
    uw, raw = u.to(wdtype), delta.to(wdtype)
    if delta_bias is not None:
        raw = raw + delta_bias.to(wdtype)[:, None]
    dw = F.softplus(raw) if delta_softplus else raw
    Aw = A.to(wdtype)
    Bw, Cw = _per_channel(B, batch, dim, wdtype), _per_channel(C, batch, dim, wdtype)
    Dw = None if D is None else D.to(wdtype)
    zw = None if z is None else z.to(wdtype)
    gw = dout.to(wdtype)
    dl = None if dlast_state is None else dlast_state.to(wdtype)
    init = None if initial_state is None else initial_state.to(wdtype)

    bounds = [0, length] if cu_seqlens is None else [int(b) for b in cu_seqlens.tolist()]
    parts = []
    for s, (start, end) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        rows = slice(None) if cu_seqlens is None else slice(s, s + 1)
        h0 = (
            init[rows]
            if init is not None
            else torch.zeros(
                batch if cu_seqlens is None else 1, dim, n, dtype=wdtype, device=u.device
            )
        )
        sl = slice(start, end)

        parts.append(
            _scan_backward_loop(
                gw[..., sl],
                None if dl is None else dl[rows],
                uw[..., sl],
                dw[..., sl],
                Aw,
                _steps(Bw, sl),
                _steps(Cw, sl),
                h0,
                Dw,
                None if zw is None else zw[..., sl],
            )  # fmt: skip
        )
    du = torch.cat([p[0] for p in parts], -1)
    ddt = torch.cat([p[1] for p in parts], -1)
    dA = sum(p[2] for p in parts)
    dB = torch.cat([p[3] for p in parts], -1)
    dC = torch.cat([p[4] for p in parts], -1)
    dD = sum(p[5] for p in parts)
    dz = torch.cat([p[6] for p in parts], -1)
    dh0 = torch.cat([p[7] for p in parts], 0)
    ddelta = ddt * torch.sigmoid(raw) * (raw <= 20) + ddt * (raw > 20) if delta_softplus else ddt
    return (
        du,
        ddelta,
        dA,
        _to_layout(dB, B),
        _to_layout(dC, C),
        dD if D is not None else None,
        dz if z is not None else None,
        ddelta.sum(dim=(0, 2)) if delta_bias is not None else None,
        dh0 if initial_state is not None else None,
    )
