"""Triton (kernels/scan.py) and CUDA (csrc/cuda/scan.cu) selective scan against the reference.

Through the public API (``dlcore.selective_scan`` with the backend forced): outputs, last state
and every gradient against the reference's autograd by DESIGN.md's parity rule (float64
reference, same-dtype reference for the tolerance). Through the kernel layer directly (the Triton
launchers, or the ``torch.ops.dlcore.*_kernel`` ops of the CUDA extension, which take the same
arguments): chunk states for odd chunk sizes, NaN-poisoned output and gradient buffers, the
deterministic backward. On a CPU-only machine Triton runs in the interpreter and the CUDA cases
are reported as skips.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICE, backends_for

import dlcore
from dlcore.reference.scan import (
    selective_scan_chunked_reference,
    selective_scan_reference,
    selective_state_update_reference,
)
from dlcore.testing import assert_parity, poison_


@pytest.fixture(params=backends_for(DEVICE, ("triton", "cuda")))
def backend(request):
    return request.param


GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def _scan_kernels():
    from dlcore.backends import triton_kernels

    return triton_kernels("scan")


def _kernel_layer(backend):
    """(fwd, bwd, state_update) of the kernel layer for ``backend``: same arguments for both."""
    if backend == "triton":
        K = _scan_kernels()
        return K.selective_scan_fwd, K.selective_scan_bwd, K.selective_state_update
    ops = torch.ops.dlcore
    return (
        ops.selective_scan_fwd_kernel,
        ops.selective_scan_bwd_kernel,
        ops.selective_state_update_kernel,
    )


def make_inputs(
    batch, dim, length, n, *, b_kind="var", c_kind="var", d=True, z=True, bias=True,
    softplus=True, init=False, cu=None, dtype=torch.float32, noncontig=False, seed=0,
):  # fmt: skip
    """Random scan inputs. b_kind/c_kind: "const" (dim, N), "var" (batch, N, L) or an int G for
    grouped (batch, G, N, L). u, delta, z, B, C in ``dtype``; A, D, delta_bias, initial_state in
    fp32 (the compute dtype). ``noncontig`` makes every sequence input a strided view."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, dt=dtype):
        if noncontig and len(shape) >= 2:
            # Every other row of a wider buffer: outer strides differ, last stride stays 1.
            big = torch.randn(*shape[:-2], shape[-2] * 2, shape[-1] + 3, generator=gen)
            return (big[..., ::2, 1 : shape[-1] + 1] * scale).to(DEVICE, dt)
        return (torch.randn(*shape, generator=gen) * scale).to(DEVICE, dt)

    def bc(kind):
        if kind == "const":
            return rnd(dim, n)
        if kind == "var":
            return rnd(batch, n, length)
        return rnd(batch, kind, n, length)

    u = rnd(batch, dim, length)
    delta = rnd(batch, dim, length, scale=0.5)
    A = -torch.exp(rnd(dim, n, scale=0.5, dt=torch.float32))
    B, C = bc(b_kind), bc(c_kind)
    kwargs = {"delta_softplus": softplus, "return_last_state": True}
    if d:
        kwargs["D"] = rnd(dim, dt=torch.float32)
    if z:
        kwargs["z"] = rnd(batch, dim, length)
    if bias:
        kwargs["delta_bias"] = rnd(dim, scale=0.5, dt=torch.float32)
    rows = batch
    if cu is not None:
        kwargs["cu_seqlens"] = torch.tensor(cu, dtype=torch.int32, device=DEVICE)
        rows = len(cu) - 1
    if init:
        kwargs["initial_state"] = rnd(rows, dim, n, dt=torch.float32)
    if not softplus:
        # Keep delta' positive without softplus, as a trained dt projection gives.
        delta = (delta.float().abs() + 0.05).to(dtype)
        if bias:
            kwargs["delta_bias"] = kwargs["delta_bias"].abs()
    return [u, delta, A, B, C], kwargs


def _float64(t):
    return t.detach().double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def _leaves(args, kwargs, cast):
    """Fresh differentiable copies of the tensor inputs, in GRAD_NAMES order."""
    args = [cast(a).detach().requires_grad_() for a in args]
    kw = {}
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            v = cast(v).detach().requires_grad_()
        kw[k] = v
    named = dict(zip(GRAD_NAMES[:5], args, strict=True))
    named.update({k: kw[k] for k in GRAD_NAMES[5:] if k in kw})
    return args, kw, named


def _run(fn, args, kwargs, cast, dout, dlast, backend=None):
    """Forward and backward of ``fn``, both under ``backend`` (the backward dispatches when
    autograd runs it, so the forced backend must still be in force then)."""
    a, kw, named = _leaves(args, kwargs, cast)
    with dlcore.backend(backend):
        out, last = fn(*a, **kw)
        loss = (out.double() * dout.double()).sum() + (last.double() * dlast.double()).sum()
        grads = torch.autograd.grad(loss, list(named.values()))
    return out, last, dict(zip(named, grads, strict=True))


def check_scan_parity(backend, args, kwargs, dtype):
    gen = torch.Generator().manual_seed(1)
    u = args[0]
    rows = kwargs["cu_seqlens"].shape[0] - 1 if "cu_seqlens" in kwargs else u.shape[0]
    dout = torch.randn(u.shape, generator=gen).to(DEVICE, dtype)
    dlast = torch.randn(rows, u.shape[1], args[2].shape[1], generator=gen).to(DEVICE)

    def same(t):
        return t

    out, last, grads = _run(dlcore.selective_scan, args, kwargs, same, dout, dlast, backend)
    out64, last64, grads64 = _run(selective_scan_reference, args, kwargs, _float64, dout, dlast)
    out_lp, last_lp, grads_lp = _run(selective_scan_reference, args, kwargs, same, dout, dlast)
    assert out.dtype == u.dtype and last.dtype == torch.float32
    assert_parity(out, out64, out_lp, name="out")
    assert_parity(last, last64, last_lp, name="last_state")
    for name, g in grads.items():
        assert g.dtype == grads_lp[name].dtype, name
        assert_parity(g, grads64[name], grads_lp[name], name=f"d{name}")


# Representative default subset (the interpreter runs a Python loop per scan element).
CASES = {
    "L1-N16-var-all": dict(shape=(2, 3, 1, 16), init=True),
    "L7-N1-const-plain": dict(shape=(1, 3, 7, 1), b_kind="const", c_kind="const", d=False,
                              z=False, bias=False, softplus=False),
    "L33-N16-grouped-h0": dict(shape=(2, 4, 33, 16), b_kind=2, c_kind="var", bias=False,
                               init=True),
    "L130-N16-var-bf16": dict(shape=(1, 2, 130, 16), dtype=torch.bfloat16),
    "L130-N1-cu-h0": dict(shape=(1, 4, 130, 1), b_kind=2, c_kind=4, init=True,
                          cu=[0, 3, 3, 70, 71, 130]),
    "L33-N16-constB-groupedC-bf16": dict(shape=(2, 4, 33, 16), b_kind="const", c_kind=2,
                                         z=False, init=True, dtype=torch.bfloat16),
    "L33-N16-noncontig": dict(shape=(2, 3, 33, 16), noncontig=True, init=True),
}  # fmt: skip
SLOW_CASES = {
    "L130-N64-grouped-fp16": dict(shape=(2, 4, 130, 64), b_kind=2, c_kind=2,
                                  dtype=torch.float16),
    "L200-N256-var": dict(shape=(1, 2, 200, 256), init=True),
    "L1000-N16-cu": dict(shape=(1, 3, 1000, 16), cu=[0, 1, 500, 999, 1000], init=True),
    "L257-N16-const-bf16-noncontig": dict(shape=(2, 3, 257, 16), b_kind="const",
                                          c_kind="const", dtype=torch.bfloat16, noncontig=True),
}  # fmt: skip


def _case(spec):
    spec = dict(spec)
    batch, dim, length, n = spec.pop("shape")
    dtype = spec.get("dtype", torch.float32)
    return make_inputs(batch, dim, length, n, **spec), dtype


@pytest.mark.parametrize("case", list(CASES))
def test_scan_parity(backend, case):
    (args, kwargs), dtype = _case(CASES[case])
    check_scan_parity(backend, args, kwargs, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(SLOW_CASES))
def test_scan_parity_slow(backend, case):
    (args, kwargs), dtype = _case(SLOW_CASES[case])
    check_scan_parity(backend, args, kwargs, dtype)


def _launch(backend, args, kwargs, chunk_size, deterministic, dout, dlast):
    """Forward and backward through the kernel layer with NaN-filled buffers."""
    fwd_kernel, bwd_kernel, _ = _kernel_layer(backend)
    u, delta, A, B, C = args
    B = B.unsqueeze(1) if B.dim() == 3 else B
    C = C.unsqueeze(1) if C.dim() == 3 else C
    D, z, bias = kwargs.get("D"), kwargs.get("z"), kwargs.get("delta_bias")
    h0, cu = kwargs.get("initial_state"), kwargs.get("cu_seqlens")
    softplus = kwargs["delta_softplus"]
    batch, dim, length = u.shape
    rows = cu.shape[0] - 1 if cu is not None else batch
    n = A.shape[1]
    f32 = torch.float32
    out = poison_(torch.empty_like(u))
    last = poison_(u.new_empty(rows, dim, n, dtype=f32))
    chunks = poison_(u.new_empty(batch, dim, math.ceil(length / chunk_size), n, dtype=f32))
    fwd = (u, delta, A, B, C, D, z, bias, h0, cu, softplus, chunk_size)
    fwd_kernel(*fwd, out, last, chunks)

    def buf(t):
        return None if t is None else poison_(u.new_empty(t.shape, dtype=f32))

    grads = [buf(t) for t in (u, delta, A, B, C, D, z, bias, h0)]
    bwd_kernel(dout, *fwd, chunks, dlast, deterministic, *grads)
    return out, last, chunks, grads


@pytest.mark.parametrize(
    "chunk_size,spec",
    [
        (7, dict(shape=(2, 3, 33, 16), b_kind=3, c_kind="const", init=True)),
        (16, dict(shape=(1, 3, 40, 5), init=True, cu=[0, 7, 7, 16, 29, 40])),
        (64, dict(shape=(1, 2, 70, 64), b_kind="var", c_kind=2, init=True)),
    ],
    ids=["chunk7-grouped", "chunk16-cu-empty-seq", "chunk64-N64-subtiles"],
)
def test_launchers_chunk_states_and_poisoned_buffers(backend, chunk_size, spec):
    (args, kwargs), _ = _case(spec)
    u, A = args[0], args[2]
    rows = kwargs["cu_seqlens"].shape[0] - 1 if "cu_seqlens" in kwargs else u.shape[0]
    gen = torch.Generator().manual_seed(2)
    dout = torch.randn(u.shape, generator=gen).to(DEVICE)
    dlast = torch.randn(rows, u.shape[1], A.shape[1], generator=gen).to(DEVICE)
    out, last, chunks, grads = _launch(backend, args, kwargs, chunk_size, False, dout, dlast)

    ref_kwargs = {k: v for k, v in kwargs.items() if k != "return_last_state"}
    a64, kw64, named = _leaves(args, ref_kwargs, _float64)
    out64, last64, chunks64 = selective_scan_chunked_reference(*a64, chunk_size=chunk_size, **kw64)
    assert_parity(out, out64, name="out")
    assert_parity(last, last64, name="last_state")
    assert_parity(chunks, chunks64, name="chunk_states")
    loss = (out64 * dout.double()).sum() + (last64 * dlast.double()).sum()
    grads64 = torch.autograd.grad(loss, list(named.values()))
    by_name = dict(zip(GRAD_NAMES, grads, strict=True))
    for name, g64 in zip(named, grads64, strict=True):
        g = by_name[name]
        assert_parity(g, g64.reshape(g.shape), name=f"d{name}")


@pytest.mark.parametrize("split_target", [512, 2], ids=["channel-per-program", "channel-runs"])
def test_deterministic_backward_is_bitwise_reproducible(backend, split_target, monkeypatch):
    # Grouped B (3 channels per group) and shared variable C: the paths that add up channels.
    # A small split target makes each program loop over a run of channels (read-modify-write).
    if backend == "triton":
        monkeypatch.setattr(_scan_kernels(), "_DET_SPLIT_TARGET", split_target)
    (args, kwargs), _ = _case(dict(shape=(1, 6, 20, 16), b_kind=2, c_kind="var", init=True))
    gen = torch.Generator().manual_seed(3)
    dout = torch.randn(args[0].shape, generator=gen).to(DEVICE)
    dlast = torch.randn(1, 6, 16, generator=gen).to(DEVICE)
    first = _launch(backend, args, kwargs, 8, True, dout, dlast)[3]
    second = _launch(backend, args, kwargs, 8, True, dout, dlast)[3]
    atomic = _launch(backend, args, kwargs, 8, False, dout, dlast)[3]
    for name, g1, g2, g3 in zip(GRAD_NAMES, first, second, atomic, strict=True):
        if g1 is None:
            continue
        assert torch.equal(g1, g2), f"d{name} differs between deterministic runs"
        torch.testing.assert_close(g1, g3, rtol=1e-5, atol=1e-5, msg=f"d{name}")


def test_deterministic_flag_through_the_api(backend):
    (args, kwargs), _ = _case(dict(shape=(2, 4, 20, 16), b_kind=2, c_kind=2))

    def grads():
        a, kw, named = _leaves(args, kwargs, lambda t: t)
        with dlcore.backend(backend):
            out, last = dlcore.selective_scan(*a, deterministic=True, **kw)
            return torch.autograd.grad(out.sum() + last.sum(), list(named.values()))

    for g1, g2 in zip(grads(), grads(), strict=True):
        assert torch.equal(g1, g2)


@pytest.mark.parametrize(
    "dtype,groups,opts",
    [
        (torch.float32, (0, 0), dict(D=True, z=True, dt_bias=True, dt_softplus=True)),
        (torch.float32, (2, 2), dict()),
        (torch.bfloat16, (3, 4), dict(D=True, z=True, dt_bias=True, dt_softplus=True)),
    ],
    ids=["fp32-variable-all", "fp32-grouped-plain", "bf16-grouped-B3-C4-all"],
)
def test_state_update(backend, dtype, groups, opts):
    gen = torch.Generator().manual_seed(4)
    batch, dim, n = 3, 12, 16

    def rnd(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen).to(DEVICE, dt)

    state = rnd(batch, dim, n, dt=torch.float32)
    x, dt = rnd(batch, dim), (rnd(batch, dim).float() * 0.5).to(dtype)
    A = -torch.exp(rnd(dim, n, dt=torch.float32) * 0.5)
    B, C = (rnd(batch, n) if g == 0 else rnd(batch, g, n) for g in groups)
    kw = dict(
        D=rnd(dim, dt=torch.float32) if opts.get("D") else None,
        z=rnd(batch, dim) if opts.get("z") else None,
        dt_bias=rnd(dim, dt=torch.float32) if opts.get("dt_bias") else None,
        dt_softplus=opts.get("dt_softplus", False),
    )
    s_k, s64, s_lp = state.clone(), state.double(), state.clone()
    with dlcore.backend(backend):
        out = dlcore.selective_state_update(s_k, x, dt, A, B, C, **kw)
    cast = {k: _float64(v) for k, v in kw.items()}
    out64 = selective_state_update_reference(s64, *map(_float64, (x, dt, A, B, C)), **cast)
    out_lp = selective_state_update_reference(s_lp, x, dt, A, B, C, **kw)
    assert out.dtype == dtype
    assert_parity(out, out64, out_lp, name="out")
    assert_parity(s_k, s64, s_lp, name="state")


def test_state_update_launcher_writes_poisoned_output(backend):
    update_kernel = _kernel_layer(backend)[2]
    gen = torch.Generator().manual_seed(5)
    batch, dim, n = 2, 70, 5  # dim not a multiple of the channel tile

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE)

    state, x, dt = rnd(batch, dim, n), rnd(batch, dim), rnd(batch, dim).abs()
    A, B, C = -rnd(dim, n).abs(), rnd(batch, 1, n), rnd(batch, 1, n)
    out = poison_(x.new_empty(batch, dim))
    expect_state = state.double()
    expect = selective_state_update_reference(
        expect_state, x.double(), dt.double(), A.double(), B.double(), C.double()
    )
    update_kernel(state, x, dt, A, B, C, None, None, None, False, out)
    assert_parity(out, expect, name="out")
    assert_parity(state, expect_state, name="state")
