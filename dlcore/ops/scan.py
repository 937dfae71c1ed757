"""Selective scan ops: ``dlcore.selective_scan`` and ``dlcore.selective_state_update``.

Public functions validate and normalise inputs, then call registered custom ops
(``dlcore::selective_scan_fwd``, ``dlcore::selective_scan_bwd``,
``dlcore::selective_state_update``) that have fake impls and autograd, so torch.compile
(fullgraph), meta tensors and opcheck work. The op bodies pick a backend and call the kernel
layer.

Kernel contract (C++ ops ``torch.ops.dlcore.*_kernel`` declared in csrc/dlcore.cpp, and the Triton
launchers ``dlcore.kernels.scan.selective_scan_fwd / selective_scan_bwd /
selective_state_update`` taking exactly the same arguments in the same order)::

  selective_scan_fwd_kernel(u, delta, A, B, C, D?, z?, delta_bias?, initial_state?, cu_seqlens?,
                            delta_softplus, chunk_size, out!, last_state!, chunk_states!)
    u, delta, z, out  (batch, dim, L), stride(-1) == 1, any outer strides; u, delta and z each
                      fp32/fp16/bf16 (fp64 on the cpu backend); out has u's dtype.
    A                 (dim, N) real, compute dtype (fp32; fp64 when the inputs are fp64), N <= 256.
    B, C              (dim, N) constant, or (batch, G, N, L) variable/grouped with stride(-1) == 1
                      and any float dtype; dim % G == 0 and channel d uses group d // (dim // G).
                      (The ops layer turns (batch, N, L) into G = 1 with unsqueeze(1).)
    D, delta_bias     (dim,) compute dtype.
    initial_state     (batch, dim, N) compute dtype; (nseq, dim, N) with cu_seqlens.
    cu_seqlens        int32 (nseq + 1,), batch == 1, 0 = c_0 <= c_1 <= ... <= c_nseq = L: packed
                      sequences; the state restarts at every c_s from initial_state[s] (or 0).
    delta' = softplus(delta + delta_bias) if delta_softplus else delta + delta_bias, with
             softplus(x) = x if x > 20 else log1p(exp(x)) (torch's and mamba_ssm's threshold)
    h_t = exp(delta'_t A) * h_{t-1} + delta'_t B_t u_t;   y_t = <C_t, h_t> + D u_t
    out = y * silu(z) when z is given, else y.
    last_state        (batch, dim, N) compute dtype: state after the last step ((nseq, dim, N) with
                      cu_seqlens; an empty sequence gives its initial state).
    chunk_states      (batch, dim, ceil(L / chunk_size), N) compute dtype: the state before the
                      first step of each chunk of chunk_size packed positions (at a sequence start
                      that sequence's initial state); what the backward recomputes from. Kernels
                      accept any chunk_size >= 1 (the ops layer passes CHUNK_SIZE).
    Every element of out, last_state and chunk_states is written (callers may pass NaN-filled
    buffers). All states and accumulation are in the compute dtype. The reference that defines
    all three outputs is dlcore.reference.scan.selective_scan_chunked_reference.

  selective_scan_bwd_kernel(dout, u, delta, A, B, C, D?, z?, delta_bias?, initial_state?,
                            cu_seqlens?, delta_softplus, chunk_size, chunk_states, dlast_state?,
                            deterministic, du!, ddelta!, dA!, dB!, dC!, dD!?, dz!?, ddelta_bias!?,
                            dinitial_state!?)
    dout (batch, dim, L) in out's dtype, stride(-1) == 1; dlast_state like last_state or None.
    Gradient buffers are in the compute dtype, contiguous, shaped like their inputs (dB/dC like
    B/C as passed to the kernel: (dim, N) or (batch, G, N, L)); the kernel overwrites every
    element (no zero-init needed). dD/dz/ddelta_bias/dinitial_state are given exactly when D/z/
    delta_bias/initial_state are. The reverse scan recomputes the forward states of each chunk
    from chunk_states. deterministic=True: no atomics, fixed-order reductions (bitwise identical
    runs); the ops layer sets it from the user's flag or torch.are_deterministic_algorithms_enabled.
    The hand-written reverse scan dlcore.reference.scan.selective_scan_backward_reference is its
    spec (the eager backend runs it; tests check it against autograd through the reference).

  selective_state_update_kernel(state!, x, dt, A, B, C, D?, z?, dt_bias?, dt_softplus, out!)
    state (batch, dim, N) compute dtype, stride(-1) == 1, updated in place; x, dt, z, out
    (batch, dim) (out in x's dtype); A (dim, N); B, C (batch, G, N) (the ops layer turns
    (batch, N) into G = 1); D, dt_bias (dim,). Same discretisation as one scan step.
"""

from __future__ import annotations

import functools
import importlib.util
import math

import torch

from .. import _ext
from ..backends import triton_kernels
from ..check import Case
from ..reference.scan import (
    selective_scan_backward_reference,
    selective_scan_chunked_reference,
    selective_scan_reference,
    selective_state_update_reference,
)
from .common import (
    FLOAT_DTYPES,
    check_tensor,
    dispatch,
    last_dim_contiguous,
    register_autograd,
)

Tensor = torch.Tensor
MAX_STATE = 256
# States saved for the backward every CHUNK_SIZE steps: memory batch*dim*N*L/CHUNK_SIZE.
CHUNK_SIZE = 64
_KERNEL_DTYPES = (*FLOAT_DTYPES, torch.float64)
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def _triton_launchers():
    """dlcore.kernels.scan, imported on first use (in interpreter mode on CPU-only machines)."""
    return triton_kernels("scan")


def _has_kernel(op: str, key: str) -> bool:
    """Whether the C++ kernel op is built and registered for dispatch key ``key``."""
    return _ext.CPU_EXT_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(
        f"dlcore::{op}_kernel", key
    )


def _kernel_backends(op: str, compute_dtype: torch.dtype) -> tuple[str, ...]:
    """Backends with a kernel for ``op`` and this compute dtype (fp64 only on the cpu kernel)."""
    names = ["cpu"] if _has_kernel(op, "CPU") else []
    if compute_dtype != torch.float64:
        if _has_kernel(op, "CUDA"):
            names.append("cuda")
        if _HAS_TRITON:
            names.append("triton")
    return tuple(names)


def _nchunks(length: int, chunk_size: int) -> int:
    return max(1, math.ceil(length / chunk_size))


# ---------------------------------------------------------------- forward op


def _fwd_kernel(name, u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens, softplus,
                chunk_size):  # fmt: skip
    batch, dim, length = u.shape
    n = A.shape[1]
    rows = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else batch
    out = torch.empty_like(u, memory_format=torch.contiguous_format)
    last = u.new_empty(rows, dim, n, dtype=A.dtype)
    chunks = u.new_empty(batch, dim, _nchunks(length, chunk_size), n, dtype=A.dtype)
    args = (u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens, softplus, chunk_size)
    if name == "triton":
        _triton_launchers().selective_scan_fwd(*args, out, last, chunks)
    else:
        torch.ops.dlcore.selective_scan_fwd_kernel(*args, out, last, chunks)
    return out, last, chunks


def _fwd_eager(u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens, softplus,
               chunk_size):  # fmt: skip
    out, last, chunks = selective_scan_chunked_reference(
        u, delta, A, B, C, D, z, delta_bias, softplus, initial_state, cu_seqlens, chunk_size
    )
    return out, last.to(A.dtype).contiguous(), chunks.to(A.dtype).contiguous()


@torch.library.custom_op("dlcore::selective_scan_fwd", mutates_args=())
def selective_scan_fwd(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    initial_state: Tensor | None,
    cu_seqlens: Tensor | None,
    delta_softplus: bool,
    chunk_size: int,
    deterministic: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(out, last_state, chunk_states) of the kernel contract, on the selected backend.
    ``deterministic`` only matters to the backward (saved for it)."""
    impls = {
        name: functools.partial(_fwd_kernel, name)
        for name in _kernel_backends("selective_scan_fwd", A.dtype)
    }
    impls["eager"] = _fwd_eager
    args = (u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens, delta_softplus)
    return dispatch("selective_scan", impls, u.device, *args, chunk_size)


@selective_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens, delta_softplus, chunk_size,
      deterministic):  # fmt: skip
    batch, dim, length = u.shape
    n = A.shape[1]
    rows = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else batch
    out = torch.empty_like(u, memory_format=torch.contiguous_format)
    last = u.new_empty(rows, dim, n, dtype=A.dtype)
    chunks = u.new_empty(batch, dim, _nchunks(length, chunk_size), n, dtype=A.dtype)
    return out, last, chunks


# ---------------------------------------------------------------- backward op


def _grad_buffers(u, A, B, C, D, z, delta_bias, initial_state):
    """Gradient buffers in the compute dtype; a distinct empty (0,) tensor for each absent
    optional input (custom op outputs may not alias each other)."""
    inputs = (u, u, A, B, C, D, z, delta_bias, initial_state)
    return tuple(
        torch.empty(t.shape if t is not None else (0,), dtype=A.dtype, device=u.device)
        for t in inputs
    )


def _bwd_kernel(name, dout, dlast, u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens,
                softplus, chunk_size, chunks, deterministic):  # fmt: skip
    grads = _grad_buffers(u, A, B, C, D, z, delta_bias, initial_state)
    given = (D, z, delta_bias, initial_state)
    opt = [g if src is not None else None for g, src in zip(grads[5:], given, strict=True)]
    args = (dout, u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens, softplus,
            chunk_size, chunks, dlast, deterministic, *grads[:5], *opt)  # fmt: skip
    if name == "triton":
        _triton_launchers().selective_scan_bwd(*args)
    else:
        torch.ops.dlcore.selective_scan_bwd_kernel(*args)
    return grads


def _bwd_eager(dout, dlast, u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens,
               softplus, chunk_size, chunks, deterministic):  # fmt: skip
    grads = selective_scan_backward_reference(
        dout, dlast, u, delta, A, B, C, D, z, delta_bias, softplus, initial_state, cu_seqlens
    )
    return tuple(
        g.to(A.dtype).contiguous() if g is not None else u.new_empty(0, dtype=A.dtype)
        for g in grads
    )


@torch.library.custom_op("dlcore::selective_scan_bwd", mutates_args=())
def selective_scan_bwd(
    dout: Tensor,
    dlast_state: Tensor | None,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    initial_state: Tensor | None,
    cu_seqlens: Tensor | None,
    delta_softplus: bool,
    chunk_size: int,
    chunk_states: Tensor,
    deterministic: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state) in the compute
    dtype; absent optional inputs give empty (0,) tensors."""
    impls = {
        name: functools.partial(_bwd_kernel, name)
        for name in _kernel_backends("selective_scan_bwd", A.dtype)
    }
    impls["eager"] = _bwd_eager
    args = (dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens)
    return dispatch(
        "selective_scan_bwd", impls, u.device, *args, delta_softplus, chunk_size, chunk_states,
        deterministic,
    )  # fmt: skip


@selective_scan_bwd.register_fake
def _(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens,
      delta_softplus, chunk_size, chunk_states, deterministic):  # fmt: skip
    return _grad_buffers(u, A, B, C, D, z, delta_bias, initial_state)


def _setup_context(ctx, inputs, output):
    (u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens, softplus, chunk_size,
     deterministic) = inputs  # fmt: skip
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens, output[2])
    ctx.softplus = softplus
    ctx.chunk_size = chunk_size
    ctx.deterministic = deterministic


def _backward(ctx, dout, dlast, _dchunks):
    u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens, chunks = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(u)
    grads = selective_scan_bwd(
        last_dim_contiguous(dout.to(u.dtype)),
        None if dlast is None else dlast.to(A.dtype).contiguous(),
        u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens, ctx.softplus,
        ctx.chunk_size, chunks,
        ctx.deterministic or torch.are_deterministic_algorithms_enabled(),
    )  # fmt: skip
    inputs = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    out = [None if t is None else g.to(t.dtype) for g, t in zip(grads, inputs, strict=True)]
    return (*out, None, None, None, None)


register_autograd(selective_scan_fwd, _backward, setup_context=_setup_context)


# ---------------------------------------------------------------- decode step op


def _update_kernel(name, state, x, dt, A, B, C, D, z, dt_bias, softplus):
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    work = state if state.dtype == A.dtype and state.stride(-1) == 1 else state.to(A.dtype)
    args = (work, x, dt, A, B, C, D, z, dt_bias, softplus, out)
    if name == "triton":
        _triton_launchers().selective_state_update(*args)
    else:
        torch.ops.dlcore.selective_state_update_kernel(*args)
    if work is not state:
        state.copy_(work)
    return out


def _update_eager(state, x, dt, A, B, C, D, z, dt_bias, softplus):
    return selective_state_update_reference(state, x, dt, A, B, C, D, z, dt_bias, softplus)


@torch.library.custom_op("dlcore::selective_state_update", mutates_args=("state",))
def selective_state_update_op(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    dt_bias: Tensor | None,
    dt_softplus: bool,
) -> Tensor:
    """One decode step on the selected backend; ``state`` is updated in place."""
    impls = {
        name: functools.partial(_update_kernel, name)
        for name in _kernel_backends("selective_state_update", A.dtype)
    }
    impls["eager"] = _update_eager
    args = (state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    return dispatch("selective_state_update", impls, x.device, *args)


@selective_state_update_op.register_fake
def _(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


# Fake impls of the C++ kernel ops (schemas in csrc/dlcore.cpp), for opcheck and tracing.
if _ext.CPU_EXT_ERROR is None:

    @torch.library.register_fake("dlcore::selective_scan_fwd_kernel")
    def _(u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens, delta_softplus,
          chunk_size, out, last_state, chunk_states):  # fmt: skip
        return None

    @torch.library.register_fake("dlcore::selective_scan_bwd_kernel")
    def _(dout, u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens, delta_softplus,
          chunk_size, chunk_states, dlast_state, deterministic, du, ddelta, dA, dB, dC, dD, dz,
          ddelta_bias, dinitial_state):  # fmt: skip
        return None

    @torch.library.register_fake("dlcore::selective_state_update_kernel")
    def _(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, out):
        return None


# ---------------------------------------------------------------- public functions


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 when any input is float64 (cpu and eager backends), else float32."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def _check_real_A(A: Tensor, op: str) -> None:
    if isinstance(A, Tensor) and A.is_complex():
        raise ValueError(
            f"{op}: complex A (dtype {str(A.dtype).replace('torch.', '')}) is not supported; "
            "dlcore implements the real-valued selective scan (Mamba), pass a real float A"
        )


def _check_state_size(n: int, op: str) -> None:
    if n > MAX_STATE or n < 1:
        raise ValueError(f"{op}: A must have 1 <= N <= {MAX_STATE} states per channel, got N={n}")


def _check_bc(name, M, batch, dim, n, length, dev):
    """B or C: constant (dim, N) [scan only], variable (batch, N[, L]) or grouped
    (batch, G, N[, L]); ``length`` is None for the decode step."""
    tail = () if length is None else (length,)
    axes = "" if length is None else ", L"
    variable_ndim = 2 + len(tail)
    allowed = (variable_ndim, variable_ndim + 1) if length is None else (2, 3, 4)
    check_tensor(name, M, ndim=allowed, dtypes=_KERNEL_DTYPES, device=dev)
    if length is not None and M.dim() == 2:
        check_tensor(name, M, shape=(dim, n), layout=f"(dim, N) for a constant {name}")
    elif M.dim() == variable_ndim:
        check_tensor(name, M, shape=(batch, n, *tail), layout=f"(batch, N{axes}) variable")
    else:
        check_tensor(name, M, shape=(batch, None, n, *tail), layout=f"(batch, G, N{axes}) grouped")
        groups = M.shape[1]
        if groups < 1 or dim % groups:
            raise ValueError(
                f"{name}: the number of groups G={groups} (shape {tuple(M.shape)}) must divide "
                f"dim={dim}"
            )


def _check_cu_seqlens(cu_seqlens: Tensor, batch: int, length: int, dev) -> Tensor:
    check_tensor(
        "cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32, torch.int64), device=dev,
        layout="(nseq + 1,)",
    )  # fmt: skip
    if batch != 1:
        raise ValueError(
            f"cu_seqlens packs sequences along L and needs batch == 1, got u with batch={batch}"
        )
    if cu_seqlens.shape[0] < 2:
        raise ValueError(
            f"cu_seqlens must hold nseq + 1 >= 2 offsets, got shape {tuple(cu_seqlens.shape)}"
        )
    if not torch.compiler.is_compiling():
        first, last = int(cu_seqlens[0]), int(cu_seqlens[-1])
        if first != 0 or last != length or bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
            raise ValueError(
                f"cu_seqlens must be non-decreasing from 0 to L={length}, got {cu_seqlens.tolist()}"
            )
    return cu_seqlens.to(torch.int32).contiguous()


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    initial_state: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    deterministic: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Mamba's selective scan with ``mamba_ssm.selective_scan_fn`` semantics.

    u, delta, z: (batch, dim, L); A: (dim, N) real, N <= 256; B, C: (dim, N) constant,
    (batch, N, L) variable or (batch, G, N, L) grouped; D, delta_bias: (dim,). Inputs in
    fp32/fp16/bf16 (fp64 on CPU); states and accumulation in fp32. Returns out (u's dtype) and,
    with ``return_last_state``, the final state (batch, dim, N) in fp32.

    Beyond mamba_ssm: ``initial_state`` (batch, dim, N) (differentiable); ``cu_seqlens``
    (nseq + 1,) int offsets of packed sequences along L (batch must be 1; the state restarts at
    each boundary, from ``initial_state[s]`` given as (nseq, dim, N); the last state is then
    (nseq, dim, N)); ``deterministic`` backward (also on under
    ``torch.use_deterministic_algorithms(True)``).
    """
    _check_real_A(A, "selective_scan")
    check_tensor("u", u, ndim=3, dtypes=_KERNEL_DTYPES, layout="(batch, dim, L)")
    dev = u.device
    batch, dim, length = u.shape
    if length < 1 or batch < 1 or dim < 1:
        raise ValueError(f"u must have batch, dim, L >= 1, got shape {tuple(u.shape)}")
    check_tensor("delta", delta, shape=u.shape, dtypes=_KERNEL_DTYPES, device=dev,
                 layout="(batch, dim, L) like u")  # fmt: skip
    check_tensor("A", A, ndim=2, dtypes=_KERNEL_DTYPES, device=dev, layout="(dim, N)")
    check_tensor("A", A, shape=(dim, None), layout="(dim, N)")
    n = A.shape[1]
    _check_state_size(n, "selective_scan")
    _check_bc("B", B, batch, dim, n, length, dev)
    _check_bc("C", C, batch, dim, n, length, dev)
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None:
            check_tensor(name, t, shape=(dim,), dtypes=_KERNEL_DTYPES, device=dev, layout="(dim,)")
    if z is not None:
        check_tensor("z", z, shape=u.shape, dtypes=_KERNEL_DTYPES, device=dev,
                     layout="(batch, dim, L) like u")  # fmt: skip
    rows = batch
    if cu_seqlens is not None:
        cu_seqlens = _check_cu_seqlens(cu_seqlens, batch, length, dev)
        rows = cu_seqlens.shape[0] - 1
    if initial_state is not None:
        check_tensor("initial_state", initial_state, shape=(rows, dim, n), dtypes=_KERNEL_DTYPES,
                     device=dev, layout="(nseq, dim, N)" if cu_seqlens is not None
                     else "(batch, dim, N)")  # fmt: skip

    cd = _compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)

    def seq(t: Tensor | None) -> Tensor | None:
        if t is None:
            return None
        return last_dim_contiguous(t.to(cd) if cd == torch.float64 else t)

    def param(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(cd).contiguous()

    B = B.unsqueeze(1) if B.dim() == 3 else B
    C = C.unsqueeze(1) if C.dim() == 3 else C
    out, last, _ = selective_scan_fwd(
        seq(u), seq(delta), param(A),
        param(B) if B.dim() == 2 else seq(B), param(C) if C.dim() == 2 else seq(C),
        param(D), seq(z), param(delta_bias), param(initial_state), cu_seqlens,
        bool(delta_softplus), CHUNK_SIZE, bool(deterministic),
    )  # fmt: skip
    out = out.to(u.dtype)
    return (out, last) if return_last_state else out


def selective_state_update(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
) -> Tensor:
    """One decode step of the selective scan (mamba_ssm's ``selective_state_update``).

    state: (batch, dim, N), updated in place (any float dtype; computed in fp32); x, dt, z:
    (batch, dim); A: (dim, N); B, C: (batch, N) or grouped (batch, G, N); D, dt_bias: (dim,).
    Returns out (batch, dim) in x's dtype.
    """
    _check_real_A(A, "selective_state_update")
    check_tensor("state", state, ndim=3, dtypes=_KERNEL_DTYPES, layout="(batch, dim, N)")
    dev = state.device
    batch, dim, n = state.shape
    _check_state_size(n, "selective_state_update")
    for name, t in (("x", x), ("dt", dt)):
        check_tensor(name, t, shape=(batch, dim), dtypes=_KERNEL_DTYPES, device=dev,
                     layout="(batch, dim)")  # fmt: skip
    check_tensor("A", A, shape=(dim, n), dtypes=_KERNEL_DTYPES, device=dev, layout="(dim, N)")
    _check_bc("B", B, batch, dim, n, None, dev)
    _check_bc("C", C, batch, dim, n, None, dev)
    for name, t in (("D", D), ("dt_bias", dt_bias)):
        if t is not None:
            check_tensor(name, t, shape=(dim,), dtypes=_KERNEL_DTYPES, device=dev, layout="(dim,)")
    if z is not None:
        check_tensor("z", z, shape=(batch, dim), dtypes=_KERNEL_DTYPES, device=dev,
                     layout="(batch, dim)")  # fmt: skip
    cd = _compute_dtype(state, x, dt, A, B, C, D, z, dt_bias)

    def row(t: Tensor | None) -> Tensor | None:
        if t is None:
            return None
        return last_dim_contiguous(t.to(cd) if cd == torch.float64 else t)

    def param(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(cd).contiguous()

    B = B.unsqueeze(1) if B.dim() == 2 else B
    C = C.unsqueeze(1) if C.dim() == 2 else C
    out = selective_state_update_op(
        state, row(x), row(dt), param(A), row(B), row(C), param(D), row(z), param(dt_bias),
        bool(dt_softplus),
    )  # fmt: skip
    return out.to(x.dtype)


# ---------------------------------------------------------------- python -m dlcore check


def _scan_case_maker(groups: int, length: int, n: int, *, cu: bool = False, init: bool = False):
    def make(dtype: torch.dtype, device: torch.device, gen: torch.Generator):
        batch, dim = (1, 6) if cu else (2, 6)

        def rnd(*shape, scale=1.0):
            return (torch.randn(*shape, generator=gen) * scale).to(dtype=dtype, device=device)

        u, z = rnd(batch, dim, length), rnd(batch, dim, length)
        delta = rnd(batch, dim, length, scale=0.5)
        A = -torch.exp(rnd(dim, n, scale=0.5))
        if groups == 0:
            B, C = rnd(dim, n), rnd(dim, n)
        elif groups == 1:
            B, C = rnd(batch, n, length), rnd(batch, n, length)
        else:
            B, C = rnd(batch, groups, n, length), rnd(batch, groups, n, length)
        kwargs = dict(D=rnd(dim), z=z, delta_bias=rnd(dim, scale=0.5), delta_softplus=True)
        kwargs["return_last_state"] = True
        if cu:
            kwargs["cu_seqlens"] = torch.tensor([0, 5, 5, length], dtype=torch.int32, device=device)
        if init:
            kwargs["initial_state"] = rnd(3 if cu else batch, dim, n)
        return (u, delta, A, B, C), kwargs

    return make


def _update_case(dtype: torch.dtype, device: torch.device, gen: torch.Generator):
    batch, dim, n = 3, 10, 16

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype=dtype, device=device)

    args = (rnd(batch, dim, n), rnd(batch, dim), rnd(batch, dim, scale=0.5))
    args += (-torch.exp(rnd(dim, n, scale=0.5)), rnd(batch, 2, n), rnd(batch, 2, n))
    return args, dict(D=rnd(dim), z=rnd(batch, dim), dt_bias=rnd(dim), dt_softplus=True)


def _run_update(fn):
    def run(state, *args, **kwargs):
        state = state.clone()
        return fn(state, *args, **kwargs), state

    return run


def parity_cases() -> list[Case]:
    names = ("triton", "cuda", "cpu", "eager") if _HAS_TRITON else ("cuda", "cpu", "eager")
    scan_cases = [
        ("variable B/C, D, z, bias, softplus, L=37, N=16", _scan_case_maker(1, 37, 16)),
        ("grouped B/C (G=3), initial_state, L=70, N=8", _scan_case_maker(3, 70, 8, init=True)),
        ("constant B/C, L=19, N=4", _scan_case_maker(0, 19, 4)),
        ("cu_seqlens [0,5,5,67], initial_state", _scan_case_maker(1, 67, 16, cu=True, init=True)),
    ]
    cases = [
        Case(
            "selective_scan",
            label,
            make,
            selective_scan,
            selective_scan_reference,
            names,
            outputs=("out", "last_state"),
        )  # fmt: skip
        for label, make in scan_cases
    ]
    cases.append(
        Case(
            "selective_state_update",
            "grouped B/C (G=2), D, z, dt_bias, softplus",
            _update_case,
            _run_update(selective_state_update),
            _run_update(selective_state_update_reference),
            names,
            outputs=("out", "state"),
        )  # fmt: skip
    )
    return cases
