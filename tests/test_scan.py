"""Selective scan: parity of every backend with the float64 reference (outputs, last state, every
gradient), chunk states and NaN-poisoned kernel buffers, the decode step, float64 gradcheck of
the cpu kernel, determinism, opcheck, torch.compile, meta tensors and bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import backends_for

import dlcore
from dlcore.ops import scan as ops
from dlcore.reference.scan import (
    selective_scan_chunked_reference,
    selective_scan_reference,
    selective_state_update_reference,
)
from dlcore.testing import assert_parity, cast_floats, poison_

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
GRADS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


@pytest.fixture(params=backends_for("cpu", ("triton", "cpu", "eager")))
def backend(request):
    if request.param == "triton" and ops._triton_launchers() is None:
        pytest.skip("triton: dlcore.kernels.scan does not provide the scan launchers yet")
    return request.param


def make_inputs(batch, dim, length, n, *, b="var", c="var", D=True, z=True, bias=True,
                init=False, cu=None, seed=0):  # fmt: skip
    """float64 inputs (cast per test). b/c: "const" (dim, N), "var" (batch, N, L) or an int G
    for grouped (batch, G, N, L). cu: list of offsets (batch must be 1)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    def bc(kind):
        if kind == "const":
            return rnd(dim, n)
        if kind == "var":
            return rnd(batch, n, length)
        return rnd(batch, kind, n, length)

    args = [rnd(batch, dim, length), rnd(batch, dim, length, scale=0.7)]
    args += [-torch.exp(rnd(dim, n, scale=0.6)), bc(b), bc(c)]
    kwargs = {
        "D": rnd(dim) if D else None,
        "z": rnd(batch, dim, length) if z else None,
        "delta_bias": rnd(dim, scale=0.5) if bias else None,
    }
    if cu is not None:
        kwargs["cu_seqlens"] = torch.tensor(cu, dtype=torch.int32)
    if init:
        rows = len(cu) - 1 if cu is not None else batch
        kwargs["initial_state"] = rnd(rows, dim, n)
    return args, kwargs


def noncontiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    """The same values as a strided view: every other element of a wider buffer, so even the
    last dimension has stride 2."""
    if t is None or t.dim() == 0:
        return t
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    wide[..., ::2] = t
    view = wide[..., ::2]
    assert not view.is_contiguous()
    return view


def run_scan_parity(backend, dtype, args, kwargs, *, softplus=True, noncontig=False):
    """Forward and backward on ``backend`` against the reference in float64 and in ``dtype``."""
    tensors = dict(zip(("u", "delta", "A", "B", "C"), args, strict=True))
    tensors.update({k: v for k, v in kwargs.items() if k != "cu_seqlens" and v is not None})
    names = [k for k in GRADS if k in tensors]
    cu = kwargs.get("cu_seqlens")
    gen = torch.Generator().manual_seed(1)

    def call(fn, inputs, cast):
        leaves = {k: cast(v).detach().requires_grad_() for k, v in inputs.items()}
        given = {k: noncontiguous(v) if noncontig else v for k, v in leaves.items()}
        out, last = fn(
            given["u"], given["delta"], given["A"], given["B"], given["C"],
            D=given.get("D"), z=given.get("z"), delta_bias=given.get("delta_bias"),
            delta_softplus=softplus, return_last_state=True,
            initial_state=given.get("initial_state"), cu_seqlens=cu,
        )  # fmt: skip
        return out, last, leaves

    dout = torch.randn(args[0].shape, generator=gen, dtype=torch.float64)
    dlast_shape = (len(cu) - 1 if cu is not None else args[0].shape[0], args[0].shape[1])
    dlast = torch.randn(*dlast_shape, args[2].shape[1], generator=gen, dtype=torch.float64)

    results = {}
    for label, fn, cast in (
        ("ref64", selective_scan_reference, lambda t: t),
        ("ref", selective_scan_reference, lambda t: t.to(dtype)),
        ("dlcore", dlcore.selective_scan, lambda t: t.to(dtype)),
    ):
        ctx = dlcore.backend(backend) if label == "dlcore" else torch.enable_grad()
        with ctx:
            out, last, leaves = call(fn, tensors, cast)
            assert out.dtype == (torch.float64 if label == "ref64" else dtype)
            loss = (out.double() * dout).sum() + (last.double() * dlast).sum()
            grads = torch.autograd.grad(loss, [leaves[k] for k in names])
        results[label] = (out, last, dict(zip(names, grads, strict=True)))

    (o64, l64, g64), (o_lp, l_lp, g_lp), (o, last, g) = (
        results["ref64"],
        results["ref"],
        results["dlcore"],
    )
    assert last.dtype == torch.float32
    assert_parity(o, o64, o_lp, name="out")
    assert_parity(last, l64, l_lp, name="last_state")
    for k in names:
        assert g[k].dtype == g_lp[k].dtype, k
        assert_parity(g[k], g64[k], g_lp[k], name=f"d{k}")


# (batch, dim, L, N, options): every length and state size of the issue, every B/C layout and
# every optional input, spread over few cases to keep the default run short.
CASES = [
    ((2, 3, 1, 16), dict(b="var", c="var")),
    ((1, 5, 7, 1), dict(b="const", c="const", D=False, z=False, bias=False)),
    ((2, 4, 7, 64), dict(b=2, c="var", init=True)),
    ((2, 6, 128, 16), dict(b=3, c=2, init=True)),
    ((1, 1, 129, 16), dict(b="var", c="const", z=False)),  # one row: chunk-parallel forward
    ((1, 4, 70, 16), dict(cu=[0, 5, 5, 64, 70], init=True)),  # packed, an empty sequence
    ((1, 3, 1000, 16), dict(b="var", c="var", cu=[0, 1, 500, 999, 1000])),
    ((1, 2, 2049, 16), dict(b=2, c=2, init=True)),
    ((2, 2, 1000, 64), dict(b="const", c="var", bias=False)),
    # enough channels for the channel-blocked forward (16 per block, a partial tail block)
    ((2, 40, 100, 16), dict(b=2, c="var", init=True)),
    ((1, 64, 70, 8), dict(b="var", c=4, cu=[0, 5, 5, 64, 70], init=True)),
    # blocked forward with N not a multiple of 8 (state groups of 8, 2 and 1), and N = 64
    ((1, 32, 37, 5), dict(b="var", c="var")),
    ((1, 16, 20, 64), dict(b="var", c="var", init=True)),
    ((2, 48, 90, 1), dict(b="var", c="var", D=False, z=False, bias=False)),
]


def _case_id(case):
    (batch, dim, length, n), opts = case
    extra = "-".join(f"{k}={v}" for k, v in opts.items() if k != "cu") + (
        "-packed" if "cu" in opts else ""
    )
    return f"b{batch}d{dim}L{length}N{n}-{extra}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_scan_parity(backend, case, dtype):
    (batch, dim, length, n), opts = case
    if backend != "cpu" and length > 128:
        pytest.skip(f"{backend}: L={length} runs on the cpu backend (interpreter/eager too slow)")
    args, kwargs = make_inputs(batch, dim, length, n, **opts)
    run_scan_parity(backend, dtype, args, kwargs)


@pytest.mark.parametrize("softplus", [False, True])
def test_scan_parity_noncontiguous(backend, softplus):
    args, kwargs = make_inputs(2, 4, 33, 8, b="var", c=2, init=True)
    if not softplus:  # plain delta must stay positive-ish for a stable recurrence
        args[1] = args[1].abs()
    run_scan_parity(backend, torch.float32, args, kwargs, softplus=softplus, noncontig=True)


def test_scan_parity_blocked_no_softplus_cpu():
    """The channel-blocked cpu forward and backward (>= 8 channels per task) with plain delta."""
    args, kwargs = make_inputs(2, 40, 77, 16, b="var", c="var", init=True, bias=False)
    args[1] = args[1].abs()
    run_scan_parity("cpu", torch.float32, args, kwargs, softplus=False)


@pytest.mark.parametrize("lo,hi", [(-90.0, -15.0), (-30.0, 30.0), (15.0, 60.0)])
def test_scan_softplus_extremes_cpu(lo, hi):
    """The vectorised softplus and exp of the blocked forward, far from the usual range: deep
    in the exp(x) tail (denormal steps), across softplus' pass-through threshold of 20."""
    args, kwargs = make_inputs(1, 32, 48, 16)
    gen = torch.Generator().manual_seed(3)
    args[1] = torch.rand(args[1].shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo
    kwargs["delta_bias"] = None
    args[2] = args[2] / (1.0 + args[1].abs().max())  # keep exp(dt * A) away from 0
    run_scan_parity("cpu", torch.float32, args, kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scan_parity_long_cpu(dtype):
    args, kwargs = make_inputs(2, 8, 2049, 64, b=4, c="var", init=True)
    run_scan_parity("cpu", dtype, args, kwargs)


# ---------------------------------------------------------------- kernel contract


def _kernel_call(args, kwargs, chunk, softplus=True):
    u, delta, A, B, C = (t.float() for t in args)
    B = B.unsqueeze(1) if B.dim() == 3 else B
    C = C.unsqueeze(1) if C.dim() == 3 else C
    opt = {k: (v.float() if v is not None and v.is_floating_point() else v)
           for k, v in kwargs.items()}  # fmt: skip
    return (u, delta, A, B, C, opt.get("D"), opt.get("z"), opt.get("delta_bias"),
            opt.get("initial_state"), opt.get("cu_seqlens"), softplus, chunk)  # fmt: skip


@pytest.mark.parametrize("chunk", [1, 5, 64])
@pytest.mark.parametrize("packed", [False, True])
def test_cpu_kernel_buffers_and_chunk_states(chunk, packed):
    """The C++ kernels write every element of NaN-poisoned buffers; chunk_states match the
    reference's definition for chunk sizes that do and do not divide L."""
    if packed:
        args, kwargs = make_inputs(1, 3, 23, 4, b=3, c="var", init=True, cu=[0, 4, 4, 10, 23])
    else:
        args, kwargs = make_inputs(2, 3, 23, 4, b="const", c=3, init=True)
    call = _kernel_call(args, kwargs, chunk)
    u, A = call[0], call[2]
    rows = len(kwargs["cu_seqlens"]) - 1 if packed else u.shape[0]
    nchunks = -(-u.shape[-1] // chunk)
    out = poison_(torch.empty_like(u))
    last = poison_(u.new_empty(rows, u.shape[1], A.shape[1]))
    states = poison_(u.new_empty(u.shape[0], u.shape[1], nchunks, A.shape[1]))
    torch.ops.dlcore.selective_scan_fwd_kernel(*call, out, last, states)
    ref_out, ref_last, ref_states = selective_scan_chunked_reference(
        *cast_floats(args, torch.float64), **cast_floats(kwargs, torch.float64),
        delta_softplus=True, chunk_size=chunk,
    )  # fmt: skip
    assert_parity(out, ref_out, name="out")
    assert_parity(last, ref_last, name="last_state")
    assert_parity(states, ref_states, name="chunk_states")

    dout = torch.randn_like(u)
    dlast = torch.randn_like(last)
    grads = [poison_(torch.empty_like(t)) for t in call[:5]]
    opt = [None if t is None else poison_(torch.empty_like(t)) for t in call[5:9]]
    torch.ops.dlcore.selective_scan_bwd_kernel(
        dout, *call[:-1], chunk, states, dlast, False, *grads, *opt
    )
    for g in [*grads, *(t for t in opt if t is not None)]:
        assert torch.isfinite(g).all()


def test_cpu_kernel_rejects_bad_buffers():
    args, kwargs = make_inputs(1, 2, 9, 4)
    call = _kernel_call(args, kwargs, 4)
    out = torch.empty(1, 2, 9)
    with pytest.raises(RuntimeError, match="chunk_states must have shape"):
        torch.ops.dlcore.selective_scan_fwd_kernel(
            *call, out, torch.empty(1, 2, 4), torch.empty(1, 2, 2, 4)
        )
    with pytest.raises(RuntimeError, match="last_state must have shape"):
        torch.ops.dlcore.selective_scan_fwd_kernel(
            *call, out, torch.empty(2, 2, 4), torch.empty(1, 2, 3, 4)
        )


# ---------------------------------------------------------------- decode step


def run_state_update_parity(backend, dtype, batch, dim, n, groups, extras=True, seed=3):
    """One decode step on ``backend`` against the reference in float64 and in ``dtype``."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    bc_shape = (batch, n) if groups is None else (batch, groups, n)
    args = (rnd(batch, dim, n), rnd(batch, dim), rnd(batch, dim, scale=0.5))
    args += (-torch.exp(rnd(dim, n, scale=0.5)), rnd(*bc_shape), rnd(*bc_shape))
    kwargs = dict(D=rnd(dim), z=rnd(batch, dim), dt_bias=rnd(dim), dt_softplus=True)
    if not extras:
        kwargs = dict(dt_softplus=False)
        args = (*args[:2], args[2].abs(), *args[3:])
    state64 = args[0].clone()
    out64 = selective_state_update_reference(state64, *args[1:], **kwargs)
    lp, kw = cast_floats(args, dtype), cast_floats(kwargs, dtype)
    state_ref = lp[0].clone()
    out_ref = selective_state_update_reference(state_ref, *lp[1:], **kw)
    state = lp[0].clone()
    with dlcore.backend(backend):
        out = dlcore.selective_state_update(state, *lp[1:], **kw)
    assert out.dtype == dtype and state.dtype == dtype
    assert_parity(out, out64, out_ref, name="out")
    assert_parity(state, state64, state_ref, name="state")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("groups", [None, 1, 2])
@pytest.mark.parametrize("extras", [True, False])
def test_state_update_parity(backend, dtype, groups, extras):
    run_state_update_parity(backend, dtype, 3, 6, 16, groups, extras)


@pytest.mark.parametrize("batch,dim,n,groups", [(2, 21, 5, 3), (1, 34, 20, None), (5, 7, 33, 7)])
def test_state_update_parity_odd_sizes_cpu(batch, dim, n, groups):
    """Row counts not a multiple of 16 and N with a masked tail (the vectorised cpu path)."""
    run_state_update_parity("cpu", torch.float32, batch, dim, n, groups, seed=4)


def test_state_update_steps_match_scan(backend):
    """L decode steps from an initial state give the scan's outputs and last state."""
    args, kwargs = make_inputs(2, 4, 9, 8, init=True)
    args, kwargs = cast_floats(args, torch.float32), cast_floats(kwargs, torch.float32)
    u, delta, A, B, C = args
    with dlcore.backend(backend):
        out, last = dlcore.selective_scan(*args, **kwargs, delta_softplus=True,
                                          return_last_state=True)  # fmt: skip
        state = kwargs["initial_state"].clone()
        steps = [
            dlcore.selective_state_update(
                state, u[..., t], delta[..., t], A, B[..., t], C[..., t], D=kwargs["D"],
                z=kwargs["z"][..., t], dt_bias=kwargs["delta_bias"], dt_softplus=True,
            )
            for t in range(u.shape[-1])
        ]  # fmt: skip
    torch.testing.assert_close(torch.stack(steps, -1), out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, last, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- gradients, determinism


@pytest.mark.parametrize(
    "shape,opts",
    [
        ((2, 3, 70, 3), dict(b=3, c="var", init=True)),  # two chunks, grouped B
        ((1, 2, 67, 2), dict(b="const", c="var", init=True, cu=[0, 3, 3, 66, 67])),
        ((1, 1, 130, 2), dict(b="var", c="var", D=False, z=False, bias=False)),
    ],
    ids=["grouped", "packed", "one-row"],
)
def test_gradcheck_cpu_float64(shape, opts):
    args, kwargs = make_inputs(*shape, **opts)
    cu = kwargs.pop("cu_seqlens", None)
    names = ["u", "delta", "A", "B", "C", *(k for k, v in kwargs.items() if v is not None)]
    leaves = [t.clone().requires_grad_() for t in args] + [
        v.clone().requires_grad_() for v in kwargs.values() if v is not None
    ]

    def fn(*tensors):
        named = dict(zip(names, tensors, strict=True))
        with dlcore.backend("cpu"):
            out, last = dlcore.selective_scan(
                *tensors[:5], D=named.get("D"), z=named.get("z"),
                delta_bias=named.get("delta_bias"), delta_softplus=True,
                return_last_state=True, initial_state=named.get("initial_state"),
                cu_seqlens=cu,
            )  # fmt: skip
        return out, last

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_deterministic_backward_is_bitwise_reproducible():
    args, kwargs = make_inputs(2, 32, 150, 16, b=2, c="var", init=True)
    args, kwargs = cast_floats(args, torch.float32), cast_floats(kwargs, torch.float32)

    def grads(**flags):
        leaves = [t.clone().requires_grad_() for t in args]
        with dlcore.backend("cpu"):
            out = dlcore.selective_scan(*leaves, **kwargs, delta_softplus=True, **flags)
        return torch.autograd.grad(out.square().sum(), leaves)

    first = grads(deterministic=True)
    for g1, g2 in zip(first, grads(deterministic=True), strict=True):
        assert torch.equal(g1, g2)
    torch.use_deterministic_algorithms(True)
    try:
        for g1, g2 in zip(first, grads(), strict=True):
            assert torch.equal(g1, g2)
    finally:
        torch.use_deterministic_algorithms(False)


# ---------------------------------------------------------------- registration


def _opcheck_inputs():
    args, kwargs = make_inputs(2, 4, 11, 4, b=2, c="var", init=True)
    args, kwargs = cast_floats(args, torch.float32), cast_floats(kwargs, torch.float32)
    u, delta, A, B, C = args
    return (u, delta, A, B, C.unsqueeze(1), kwargs["D"], kwargs["z"], kwargs["delta_bias"],
            kwargs["initial_state"], None, True, 4)  # fmt: skip


@pytest.mark.parametrize("name", ["cpu", "eager"])
def test_opcheck_scan_ops(name):
    fwd_args = _opcheck_inputs()
    with dlcore.backend(name):
        out, last, states = ops.selective_scan_fwd(*fwd_args, False)
        leaves = [
            t.clone().requires_grad_() if isinstance(t, torch.Tensor) else t for t in fwd_args
        ]
        torch.library.opcheck(ops.selective_scan_fwd, (*leaves, False))
        bwd_args = (torch.randn_like(out), torch.randn_like(last), *fwd_args, states, False)
        torch.library.opcheck(ops.selective_scan_bwd, bwd_args)
        gen = torch.Generator().manual_seed(0)
        upd = (torch.randn(2, 4, 4, generator=gen), torch.randn(2, 4, generator=gen),
               torch.rand(2, 4, generator=gen), -torch.rand(4, 4, generator=gen),
               torch.randn(2, 1, 4, generator=gen), torch.randn(2, 2, 4, generator=gen),
               torch.randn(4, generator=gen), None, None, True)  # fmt: skip
        torch.library.opcheck(ops.selective_state_update_op, upd)


def test_opcheck_kernel_ops():
    fwd_args = _opcheck_inputs()
    u, A = fwd_args[0], fwd_args[2]
    out, last = torch.empty_like(u), torch.empty(2, 4, 4)
    states = torch.empty(2, 4, 3, 4)
    torch.library.opcheck(torch.ops.dlcore.selective_scan_fwd_kernel.default,
                          (*fwd_args, out, last, states))  # fmt: skip
    torch.ops.dlcore.selective_scan_fwd_kernel(*fwd_args, out, last, states)
    grads = [torch.empty_like(t) for t in fwd_args[:5]]
    opt = [torch.empty_like(t) if t is not None else None for t in fwd_args[5:9]]
    torch.library.opcheck(
        torch.ops.dlcore.selective_scan_bwd_kernel.default,
        (torch.randn_like(u), *fwd_args, states, torch.randn_like(last), True, *grads, *opt),
    )
    gen = torch.Generator().manual_seed(0)
    upd = (torch.randn(2, 4, 4, generator=gen), torch.randn(2, 4, generator=gen),
           torch.rand(2, 4, generator=gen), A, torch.randn(2, 2, 4, generator=gen),
           torch.randn(2, 1, 4, generator=gen), None, torch.randn(2, 4, generator=gen), None,
           False, torch.empty(2, 4))  # fmt: skip
    torch.library.opcheck(torch.ops.dlcore.selective_state_update_kernel.default, upd)


def test_torch_compile_fullgraph():
    args, kwargs = make_inputs(2, 4, 20, 8, b=2, c="var", init=True)
    args, kwargs = cast_floats(args, torch.float32), cast_floats(kwargs, torch.float32)

    def block(u, delta, A, B, C, D, z, delta_bias, initial_state):
        out, last = dlcore.selective_scan(
            torch.nn.functional.silu(u), delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
            delta_softplus=True, return_last_state=True, initial_state=initial_state,
        )  # fmt: skip
        return out * 2, last.sum()

    inputs = (*args, kwargs["D"], kwargs["z"], kwargs["delta_bias"], kwargs["initial_state"])
    leaves = [t.clone().requires_grad_() for t in inputs]
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out, s = compiled(*leaves)
    ref_out, ref_s = block(*inputs)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(s, ref_s)
    (out.sum() + s).backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)


def test_meta_tensors():
    args, kwargs = make_inputs(2, 4, 20, 8, b=2, c="var", init=True)
    meta = [t.float().to("meta") for t in args]
    out, last = dlcore.selective_scan(*meta, D=kwargs["D"].float().to("meta"),
                                      return_last_state=True)  # fmt: skip
    assert out.device.type == "meta" and out.shape == (2, 4, 20) and last.shape == (2, 4, 8)


# ---------------------------------------------------------------- bad input


def _good():
    args, kwargs = make_inputs(2, 4, 9, 8, b="var", c="var")
    return cast_floats(args, torch.float32), cast_floats(kwargs, torch.float32)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a, k: a.__setitem__(2, a[2].to(torch.complex64)), "complex A"),
        (lambda a, k: a.__setitem__(0, a[0][0]), r"u must have 3 dimensions .*got shape \(4, 9\)"),
        (lambda a, k: a.__setitem__(1, a[1][:, :, :5]), r"delta must have shape \(2, 4, 9\)"),
        (lambda a, k: a.__setitem__(0, a[0].to(torch.int32)), "u must have dtype"),
        (lambda a, k: a.__setitem__(2, torch.randn(3, 8)), r"A must have shape \(4, \*\)"),
        (lambda a, k: a.__setitem__(2, -torch.rand(4, 257)), "N <= 256.*N=257"),
        (lambda a, k: a.__setitem__(3, torch.randn(2, 3, 8, 9)), "G=3 .* must divide dim=4"),
        (lambda a, k: a.__setitem__(4, torch.randn(2, 7, 9)), r"C must have shape \(2, 8, 9\)"),
        (lambda a, k: a.__setitem__(3, torch.randn(4, 7)), r"B must have shape \(4, 8\)"),
        (lambda a, k: k.__setitem__("D", torch.randn(5)), r"D must have shape \(4\) \(dim,\)"),
        (lambda a, k: k.__setitem__("z", torch.randn(2, 4, 8)), r"z must have shape"),
        (lambda a, k: k.__setitem__("initial_state", torch.randn(2, 4, 7)), "initial_state"),
        (lambda a, k: a.__setitem__(2, a[2].to("meta")), "A must be on cpu"),
        (lambda a, k: k.__setitem__("cu_seqlens", torch.tensor([0, 9])), "batch == 1"),
    ],
    ids=[
        "complex",
        "rank",
        "delta-shape",
        "int-u",
        "A-dim",
        "N>256",
        "G",
        "C-shape",
        "B-const",
        "D",
        "z",
        "init",
        "device",
        "cu-batch",
    ],  # fmt: skip
)
def test_scan_bad_input(mutate, match):
    args, kwargs = _good()
    mutate(args, kwargs)
    with pytest.raises(ValueError, match=match):
        dlcore.selective_scan(*args, **kwargs)


def test_scan_bad_cu_seqlens():
    args, kwargs = _good()
    args = [t[:1] if t.dim() == 3 else t for t in args]
    kwargs = {k: (v[:1] if v.dim() == 3 else v) for k, v in kwargs.items()}
    with pytest.raises(ValueError, match="non-decreasing from 0 to L=9"):
        dlcore.selective_scan(*args, **kwargs, cu_seqlens=torch.tensor([0, 6, 4, 9]))
    with pytest.raises(ValueError, match="non-decreasing from 0 to L=9"):
        dlcore.selective_scan(*args, **kwargs, cu_seqlens=torch.tensor([0, 4, 8]))
    with pytest.raises(ValueError, match=r"initial_state must have shape \(2, 4, 8\)"):
        dlcore.selective_scan(*args, **kwargs, cu_seqlens=torch.tensor([0, 4, 9]),
                              initial_state=torch.randn(1, 4, 8))  # fmt: skip


def test_state_update_bad_input():
    state, x, dt = torch.randn(2, 4, 8), torch.randn(2, 4), torch.rand(2, 4)
    A, B, C = -torch.rand(4, 8), torch.randn(2, 8), torch.randn(2, 8)
    with pytest.raises(ValueError, match="complex A"):
        dlcore.selective_state_update(state, x, dt, A.to(torch.complex64), B, C)
    with pytest.raises(ValueError, match=r"x must have shape \(2, 4\)"):
        dlcore.selective_state_update(state, x[:1], dt, A, B, C)
    with pytest.raises(ValueError, match="G=3 .* must divide dim=4"):
        dlcore.selective_state_update(state, x, dt, A, torch.randn(2, 3, 8), C)
    with pytest.raises(ValueError, match="N <= 256"):
        dlcore.selective_state_update(torch.randn(2, 4, 300), x, dt, A, B, C)
