"""dlcore.lora_linear / lora_linear_multi: parity of outputs and every gradient with the float64
eager reference (DESIGN.md's rule) on the triton (interpreter), cpu and eager backends; dropout
mask reproducibility; float64 gradcheck; opcheck; bad-input messages; kernel launchers writing
into NaN-poisoned outputs."""

import pytest
import torch
from conftest import backends_for
from dlcore.kernels import lora as K

import dlcore
from dlcore.ops import lora as ops
from dlcore.reference import lora as ref
from dlcore.testing import assert_parity, poison_

BACKENDS = backends_for("cpu", ("triton", "cpu", "eager"))
GRAD_NAMES = ("x", "weight", "bias", "lora_A", "lora_B")


def _rand(gen, *shape, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


def _single_inputs(lead, in_f, out_f, r, dtype, bias=True, fifo=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = _rand(gen, *lead, in_f, dtype=dtype)
    w_shape = (in_f, out_f) if fifo else (out_f, in_f)
    w = _rand(gen, *w_shape, scale=in_f**-0.5, dtype=dtype)
    b = _rand(gen, out_f, dtype=dtype) if bias else None
    a = _rand(gen, r, in_f, scale=in_f**-0.5, dtype=dtype)
    bl = _rand(gen, out_f, r, scale=r**-0.5, dtype=dtype)
    return [x, w, b, a, bl]


def _out_and_grads(fn, tensors, dy_seed=1):
    """fn's output and the gradients of <out, dy> w.r.t. every non-None tensor."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    out = fn(*leaves)
    gen = torch.Generator().manual_seed(dy_seed)
    dy = torch.randn(out.shape, generator=gen).to(out.dtype)
    used = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(out, used, dy, allow_unused=True, materialize_grads=True))
    return out.detach(), [next(grads) if t is not None else None for t in leaves]


def _assert_all(backend, fn, ref_fn, tensors, label):
    with dlcore.backend(backend):
        out, grads = _out_and_grads(fn, tensors)
    dt = tensors[0].dtype
    out64, grads64 = _out_and_grads(ref_fn, [t.double() if t is not None else t for t in tensors])
    out_lp, grads_lp = _out_and_grads(ref_fn, tensors)
    assert out.dtype == dt
    assert_parity(out, out64, out_lp, name=f"{label} out")
    for name, g, g64, glp in zip(GRAD_NAMES, grads, grads64, grads_lp, strict=False):
        if g64 is None:
            continue
        assert g.dtype == dt and g.shape == g64.shape
        assert_parity(g, g64, glp, name=f"{label} d{name}")


# (lead dims, in, out, r, bias, dropout p, fan_in_fan_out, dtype)
SINGLE_CASES = [
    ((37,), 45, 70, 1, True, 0.0, False, torch.float32),
    ((2, 9), 45, 70, 8, False, 0.0, False, torch.float32),
    ((2, 3, 5), 45, 70, 16, True, 0.2, False, torch.float32),
    ((1, 2, 3, 2), 45, 70, 64, True, 0.0, True, torch.float32),
    ((7,), 45, 70, 256, True, 0.3, False, torch.float32),
    ((1,), 33, 17, 8, True, 0.0, False, torch.float32),
    ((3, 4), 45, 70, 16, True, 0.1, True, torch.bfloat16),
    ((11,), 45, 70, 100, False, 0.0, False, torch.float16),
    ((5,), 333, 517, 16, True, 0.1, False, torch.float32),
]


def _case_id(c):
    lead, in_f, out_f, r, bias, p, fifo, dt = c
    return (
        f"x{'x'.join(map(str, lead))}-{in_f}to{out_f}-r{r}{'-bias' if bias else ''}"
        f"{f'-p{p}' if p else ''}{'-fifo' if fifo else ''}-{str(dt)[6:]}"
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", SINGLE_CASES, ids=_case_id)
def test_lora_linear_parity(backend, case):
    lead, in_f, out_f, r, bias, p, fifo, dt = case
    tensors = _single_inputs(lead, in_f, out_f, r, dt, bias, fifo)
    kw = {"dropout_p": p, "training": True, "fan_in_fan_out": fifo, "seed": 1234}

    def fn(x, w, b, a, bl):
        return dlcore.lora_linear(x, w, b, a, bl, 1.7, **kw)

    def ref_fn(x, w, b, a, bl):
        return ref.lora_linear_reference(x, w, b, a, bl, 1.7, p, 1234, fifo)

    _assert_all(backend, fn, ref_fn, tensors, _case_id(case))


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_linear_noncontiguous_and_frozen_base(backend):
    """x a transposed view, weight a strided view; base frozen (no dx/dW/db requested)."""
    gen = torch.Generator().manual_seed(3)
    x = _rand(gen, 45, 2, 13).permute(1, 2, 0)  # (2, 13, 45), last dim strided
    w = _rand(gen, 70, 90, scale=45**-0.5)[:, ::2]  # (70, 45), strides (90, 2)
    a = _rand(gen, 8, 45, scale=45**-0.5).requires_grad_()
    bl = _rand(gen, 70, 8, scale=8**-0.5).requires_grad_()
    with dlcore.backend(backend):
        out = dlcore.lora_linear(x, w, None, a, bl, 0.5)
        da, db = torch.autograd.grad(out.square().sum(), (a, bl))
    a64, b64 = a.detach().double().requires_grad_(), bl.detach().double().requires_grad_()
    ref64 = ref.lora_linear_reference(x.double(), w.double(), None, a64, b64, 0.5)
    da64, db64 = torch.autograd.grad(ref64.square().sum(), (a64, b64))
    assert_parity(out, ref64, ref.lora_linear_reference(x, w, None, a, bl, 0.5), name="out")
    assert_parity(da, da64, name="dA", floor=1e-5 * float(da64.abs().max()))
    assert_parity(db, db64, name="dB", floor=1e-5 * float(db64.abs().max()))


def _multi_inputs(lead, in_f, out_f, ranks, dtype, bias=True, fifo=False, seed=0):
    """Stacks of adapters with the given ranks, zero-padded to the largest; indices include -1,
    unsorted."""
    gen = torch.Generator().manual_seed(seed)
    n, r_max = len(ranks), max(ranks)
    x = _rand(gen, *lead, in_f, dtype=dtype)
    w_shape = (in_f, out_f) if fifo else (out_f, in_f)
    w = _rand(gen, *w_shape, scale=in_f**-0.5, dtype=dtype)
    b = _rand(gen, out_f, dtype=dtype) if bias else None
    a = torch.zeros(n, r_max, in_f, dtype=dtype)
    bl = torch.zeros(n, out_f, r_max, dtype=dtype)
    for i, r in enumerate(ranks):
        a[i, :r] = _rand(gen, r, in_f, scale=in_f**-0.5, dtype=dtype)
        bl[i, :, :r] = _rand(gen, out_f, r, scale=r**-0.5, dtype=dtype)
    idx = torch.randint(-1, n, lead, generator=gen)
    idx.view(-1)[0] = -1  # at least one base-only row
    scal = torch.linspace(0.5, 2.0, n)
    return [x, w, b, a, bl], scal, idx


# (lead dims, in, out, adapter ranks, bias, fan_in_fan_out, dtype): 5 tokens take the gather
# (BGMV) path, more the segment-sorted (SGMV) one; rank 100 uses the T buffer.
MULTI_CASES = [
    ((5,), 45, 70, (8, 4, 16), True, False, torch.float32),
    ((37,), 45, 70, (16, 1, 8, 16), True, False, torch.float32),
    ((3, 13), 45, 70, (100, 64), False, True, torch.float32),
    ((2, 2, 9), 45, 70, (8, 2), True, False, torch.bfloat16),
    ((1,), 45, 70, (8,), True, False, torch.float16),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "case", MULTI_CASES, ids=lambda c: f"x{'x'.join(map(str, c[0]))}-r{c[3]}-{str(c[6])[6:]}"
)
def test_lora_linear_multi_parity(backend, case):
    lead, in_f, out_f, ranks, bias, fifo, dt = case
    tensors, scal, idx = _multi_inputs(lead, in_f, out_f, ranks, dt, bias, fifo)

    def fn(x, w, b, a, bl):
        return dlcore.lora_linear_multi(x, w, b, a, bl, scal, idx, fan_in_fan_out=fifo)

    def ref_fn(x, w, b, a, bl):
        return ref.lora_linear_multi_reference(x, w, b, a, bl, scal.to(x.dtype), idx, fifo)

    _assert_all(backend, fn, ref_fn, tensors, f"multi {lead} {ranks}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_linear_multi_matches_single_adapter_calls(backend):
    """Each row equals lora_linear with that row's adapter (or the plain linear for -1)."""
    tensors, scal, idx = _multi_inputs((29,), 40, 50, (8, 8, 8), torch.float32)
    x, w, b, a, bl = tensors
    with dlcore.backend(backend):
        got = dlcore.lora_linear_multi(x, w, b, a, bl, scal.tolist(), idx)
        for i in range(3):
            rows = idx == i
            want = dlcore.lora_linear(x[rows], w, b, a[i], bl[i], float(scal[i]))
            torch.testing.assert_close(got[rows], want, rtol=1e-5, atol=1e-5)
    base = torch.nn.functional.linear(x[idx == -1], w, b)
    torch.testing.assert_close(got[idx == -1], base, rtol=1e-5, atol=1e-5)


# ---- dropout ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_mask_reproducible(backend):
    x, w, b, a, bl = _single_inputs((6, 5), 40, 24, 8, torch.float32)
    with dlcore.backend(backend):

        def run(**kw):
            return dlcore.lora_linear(x, w, b, a, bl, 2.0, dropout_p=0.5, **kw)

        y1, y2, y3 = (
            run(training=True, seed=5),
            run(training=True, seed=5),
            run(training=True, seed=6),
        )
        torch.manual_seed(11)
        z1 = run(training=True)
        torch.manual_seed(11)
        z2 = run(training=True)
        evaluation = run(training=False, seed=5)
        plain = dlcore.lora_linear(x, w, b, a, bl, 2.0)
    assert torch.equal(y1, y2) and torch.equal(z1, z2)
    assert not torch.allclose(y1, y3)
    assert torch.equal(evaluation, plain)
    # The same mask as the reference (which is the mask the backward regenerates).
    want = ref.lora_linear_reference(x.double(), w.double(), b.double(), a.double(), bl.double(),
                                     2.0, 0.5, 5)  # fmt: skip
    assert_parity(y1, want, name="dropout out")


def test_dropout_mask_statistics_and_triton_rng():
    keep = ref.dropout_keep_mask(99, 0, 256, 512, 0.3)
    frac = keep.float().mean().item()
    assert abs(frac - 0.7) < 0.01, frac
    # Row offsets address the same global counter: a slice of rows is the same mask.
    assert torch.equal(ref.dropout_keep_mask(99, 100, 20, 512, 0.3), keep[100:120])
    # Matches tl.randint's Philox on known counters, including the 64-bit high word.
    offs = torch.tensor([0, 1, 2**31 + 5, 2**33 + 7], dtype=torch.int64)
    got = ref.philox_randint(2**40 + 3, offs)
    assert got.dtype == torch.int64 and bool(((got >= 0) & (got < 2**32)).all())
    assert len(set(got.tolist())) == 4


def test_dropout_mask_triton_equals_reference():
    """The Triton kernel's in-register mask equals the torch Philox mask bit for bit: with W = 0,
    A = I and B = I the output is the dropped input itself."""
    m, k = 19, 40
    x = torch.randn(m, k)
    eye = torch.eye(k)
    out = poison_(torch.empty(m, k))
    xa = poison_(torch.empty(m, k))
    K.lora_forward(x, torch.zeros(k, k), None, eye, eye, 1.0, 0.25, 77, False, out, xa)
    want = ref.lora_dropout(x, 0.25, 77)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    assert torch.equal(out == 0, want == 0)


# ---- float64 gradcheck on the CPU paths ------------------------------------------------------


@pytest.mark.parametrize("backend", ["cpu", "eager"])
@pytest.mark.parametrize("fifo", [False, True])
def test_gradcheck_single(backend, fifo):
    tensors = _single_inputs((2, 3), 6, 5, 3, torch.float64, True, fifo)
    tensors = [t.requires_grad_() for t in tensors]

    def fn(*t):
        return dlcore.lora_linear(*t, 0.7, dropout_p=0.3, training=True, fan_in_fan_out=fifo,
                                  seed=3)  # fmt: skip

    with dlcore.backend(backend):
        assert torch.autograd.gradcheck(fn, tensors)


@pytest.mark.parametrize("backend", ["cpu", "eager"])
def test_gradcheck_multi(backend):
    tensors, scal, idx = _multi_inputs((7,), 6, 5, (3, 2), torch.float64)
    tensors = [t.requires_grad_() for t in tensors]

    def fn(*t):
        return dlcore.lora_linear_multi(*t, scal, idx)

    with dlcore.backend(backend):
        assert torch.autograd.gradcheck(fn, tensors)


# ---- opcheck ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["cpu", "eager"])
def test_opcheck(backend):
    x, w, b, a, bl = _single_inputs((9,), 12, 10, 4, torch.float32)
    leaves = [t.requires_grad_() for t in (x, w, b, a, bl)]
    (xs, w2, b2, as_, bs), scal, idx = _multi_inputs((9,), 12, 10, (4, 2), torch.float32)
    xa = torch.randn(9, 4)
    dy = torch.randn(9, 10)
    cases = [
        (torch.ops.dlcore.lora_linear.default, (*leaves, 0.5, 0.2, 3, False)),
        (torch.ops.dlcore.lora_linear.default, (x.detach(), w.detach().t(), None, a.detach(),
                                                bl.detach(), 0.5, 0.0, 0, True)),
        (torch.ops.dlcore.lora_linear_backward.default,
         (dy, x.detach(), w.detach(), a.detach(), bl.detach(), xa, 0.5, 0.2, 3, False,
          [True, False, True, True, True])),
        # No dropout: the cpu backend's fused factor gradients; frozen base, unused outputs.
        (torch.ops.dlcore.lora_linear_backward.default,
         (dy, x.detach(), w.detach(), a.detach(), bl.detach(), xa, 0.5, 0.0, 0, False,
          [False, False, False, True, True])),
        (torch.ops.dlcore.lora_linear_backward.default,
         (dy, x.detach(), w.detach().t(), a.detach(), bl.detach(), xa, 0.5, 0.0, 0, True,
          [True, True, False, False, True])),
        (torch.ops.dlcore.lora_linear_multi.default,
         (xs.requires_grad_(), w2, b2, as_.requires_grad_(), bs.requires_grad_(), scal,
          idx.int(), False, True)),
        (torch.ops.dlcore.lora_linear_multi.default,
         (xs.detach(), w2.t(), b2, as_.detach(), bs.detach(), scal, idx.int(), True, False)),
        (torch.ops.dlcore.lora_linear_multi_backward.default,
         (dy, xs.detach(), w2, as_.detach(), bs.detach(), scal, idx.int(), xa, False,
          [True, True, False, True, True])),
    ]  # fmt: skip
    with dlcore.backend(backend):
        for op, args in cases:
            torch.library.opcheck(op, args)


# ---- bad input -------------------------------------------------------------------------------


def test_bad_inputs():
    x, w, b, a, bl = _single_inputs((4,), 12, 10, 4, torch.float32)
    f = dlcore.lora_linear
    with pytest.raises(ValueError, match=r"rank mismatch: lora_A \(4, 12\) has rank 4 .* rank 3"):
        f(x, w, b, a, bl[:, :3], 1.0)
    with pytest.raises(ValueError, match=r"x has 11 features .* in_features=12"):
        f(x[:, :11], w, b, a, bl, 1.0)
    with pytest.raises(ValueError, match=r"lora_A must have shape \(\*, 12\)|lora_A must have"):
        f(x, w, b, a[:, :11], bl, 1.0)
    with pytest.raises(ValueError, match=r"lora_B must have shape \(10, 4\)"):
        f(x, w, b, a, bl[:9], 1.0)
    with pytest.raises(ValueError, match=r"bias must have shape \(10\)"):
        f(x, w, b[:9], a, bl, 1.0)
    with pytest.raises(ValueError, match=r"lora_A must have dtype float32, got bfloat16"):
        f(x, w, b, a.bfloat16(), bl, 1.0)
    with pytest.raises(ValueError, match=r"weight must have dtype float16, got float32"):
        f(x.half(), w, b, a, bl, 1.0)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\), got 1.0"):
        f(x, w, b, a, bl, 1.0, dropout_p=1.0, training=True)
    with pytest.raises(ValueError, match=r"weight must have 2 dimensions"):
        f(x, w[None], b, a, bl, 1.0)
    with pytest.raises(ValueError, match=r"fan_in_fan_out"):
        f(x, w, b, a, bl, 1.0, fan_in_fan_out=True)
    with pytest.raises(ValueError, match=r"x must have dtype"):
        f(x.long(), w, b, a, bl, 1.0)

    (xm, wm, bm, am, bml), scal, idx = _multi_inputs((6,), 12, 10, (4, 2), torch.float32)
    g = dlcore.lora_linear_multi
    with pytest.raises(ValueError, match=r"adapter_indices out of range: .*\[-1, 2\].*0\.\.1"):
        g(xm, wm, bm, am, bml, scal, torch.tensor([0, 1, 2, -1, 0, 0]))
    with pytest.raises(ValueError, match=r"adapter_indices out of range: .*\[-2, "):
        g(xm, wm, bm, am, bml, scal, torch.tensor([0, 1, -2, -1, 0, 0]))
    with pytest.raises(ValueError, match=r"one entry per token: shape \(6,\)"):
        g(xm, wm, bm, am, bml, scal, idx[:5])
    with pytest.raises(ValueError, match=r"rank mismatch: lora_A_stack \(2, 4, 12\)"):
        g(xm, wm, bm, am, bml[:, :, :3], scal, idx)
    with pytest.raises(ValueError, match=r"lora_B_stack must have shape \(2, 10, 4\)"):
        g(xm, wm, bm, am, bml[:, :9], scal, idx)
    with pytest.raises(ValueError, match=r"scalings must have one value per adapter \(2\), got 3"):
        g(xm, wm, bm, am, bml, [1.0, 2.0, 3.0], idx)
    with pytest.raises(ValueError, match=r"lora_B_stack must have dtype float32, got float16"):
        g(xm, wm, bm, am, bml.half(), scal, idx)
    with pytest.raises(ValueError, match=r"integer tensor"):
        g(xm, wm, bm, am, bml, scal, idx.float())


def test_forced_backend_and_meta():
    x, w, b, a, bl = _single_inputs((4,), 12, 10, 4, torch.float32)
    with dlcore.backend("cuda"), pytest.raises(RuntimeError, match="does not implement"):
        dlcore.lora_linear(x, w, b, a, bl, 1.0)
    meta = [t.to("meta") for t in (x, w, b, a, bl)]
    out = dlcore.lora_linear(*meta, 1.0)
    assert out.shape == (4, 10) and out.device.type == "meta"
    empty = dlcore.lora_linear(x[:0], w, b, a, bl, 1.0)
    assert empty.shape == (0, 10)


# ---- kernel launchers write every element (outputs poisoned with NaN) ------------------------


@pytest.mark.parametrize(
    "m,k,n,r,fifo", [(1, 33, 17, 1, False), (17, 45, 130, 64, True), (70, 40, 65, 128, False)]
)
def test_triton_launchers_fill_poisoned_outputs(m, k, n, r, fifo):
    gen = torch.Generator().manual_seed(0)
    x = _rand(gen, m, k)
    w = _rand(gen, k, n) if fifo else _rand(gen, n, k)
    b, a, bl = _rand(gen, n), _rand(gen, r, k), _rand(gen, n, r)
    out, xa = poison_(torch.empty(m, n)), poison_(torch.empty(m, r))
    K.lora_forward(x, w, b, a, bl, 0.5, 0.1, 9, fifo, out, xa)
    want = ref.lora_linear_reference(x, w, b, a, bl, 0.5, 0.1, 9, fifo)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(xa, ref.lora_dropout(x, 0.1, 9) @ a.t(), rtol=1e-4, atol=1e-4)
    dy = _rand(gen, m, n)
    grads = [poison_(torch.empty_like(t)) for t in (x, w, b, a, bl)]
    K.lora_backward(dy, x, w, a, bl, xa, 0.5, 0.1, 9, fifo, (True,) * 5, grads)
    assert all(bool(torch.isfinite(g).all()) for g in grads)
    # Multi-adapter: gather (m <= 16) and segmented paths.
    n_ad = 3
    a3, b3 = _rand(gen, n_ad, r, k), _rand(gen, n_ad, n, r)
    idx = torch.randint(-1, n_ad, (m,), generator=gen, dtype=torch.int32)
    scal = torch.tensor([0.5, 1.0, 2.0])
    out, xa = poison_(torch.empty(m, n)), poison_(torch.empty(m, r))
    K.lora_multi_forward(x, w, b, a3, b3, scal, idx, fifo, out, xa)
    want = ref.lora_linear_multi_reference(x, w, b, a3, b3, scal, idx, fifo)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    grads = [poison_(torch.empty_like(t)) for t in (x, w, b, a3, b3)]
    K.lora_multi_backward(dy, x, w, a3, b3, scal, idx, xa, fifo, (True,) * 5, grads)
    assert all(bool(torch.isfinite(g).all()) for g in grads)


def test_segment_tiles_cover_every_row_once():
    idx = torch.tensor([2, -1, 0, 2, 2, 1, -1, 0, 2, 2, 2], dtype=torch.int32)
    perm, tiles, n_tiles = K.segment_tiles(idx, 3, 2)
    seen = []
    for start, count, adapter in tiles.tolist():
        rows = perm[start : start + count].tolist()
        assert all(int(idx[r]) == adapter for r in rows)
        seen += rows
    assert sorted(seen) == list(range(11)) and n_tiles == tiles.shape[0]


def test_parity_cases_run():
    """python -m dlcore check's LoRA cases pass on the cpu backend here."""
    from dlcore.testing import cast_floats, parity

    for case in ops.parity_cases():
        args, kw = case.make(torch.float32, torch.device("cpu"), torch.Generator().manual_seed(0))
        with dlcore.backend("cpu"):
            got = case.run(*args, **kw)
        want = case.reference(*cast_floats(args, torch.float64), **cast_floats(kw, torch.float64))
        want_lp = case.reference(*args, **kw)
        got, want, want_lp = (t if isinstance(t, tuple) else (t,) for t in (got, want, want_lp))
        for g, w64, wlp, name in zip(got, want, want_lp, case.outputs, strict=True):
            assert parity(g, w64, wlp, name=name).passed


def test_cpu_path_allocates_only_output_and_rank_r_temporaries():
    """The cpu backend writes the output once and allocates nothing larger than tokens x r
    besides it; with the base frozen, backward allocates only rank-r sized tensors (no dW, no
    (tokens, out) temporary)."""
    from torch.profiler import ProfilerActivity, profile

    # 65 tokens: base GEMM + rank-r update (up to 64, lora_skinny_fwd_kernel: checked below).
    m, k, n, r = 65, 300, 500, 8
    x, w, b, a, bl = _single_inputs((m,), k, n, r, torch.float32)
    a.requires_grad_()
    bl.requires_grad_()

    def allocations(fn):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        # Every tensor allocation ends in one of these (outer ops report their callees' too).
        return sorted(e.cpu_memory_usage for e in prof.events()
                      if e.name in ("aten::empty", "aten::empty_strided")
                      and e.cpu_memory_usage > 0)  # fmt: skip

    with dlcore.backend("cpu"):
        out = dlcore.lora_linear(x, w, b, a, bl, 2.0)
        dy = torch.randn_like(out)
        torch.autograd.grad(out, (a, bl), dy)
        fwd = allocations(lambda: dlcore.lora_linear(x, w, b, a, bl, 2.0))
        out = dlcore.lora_linear(x, w, b, a, bl, 2.0)
        bwd = allocations(lambda: torch.autograd.grad(out, (a, bl), dy))
    if ops._CPU_KERNELS:
        # lora_multi_update_kernel streams B as (r, out) rows: besides out and xa, a copy of the
        # adapter-sized factor (out x r, not tokens-sized) and the float64 scaling.
        assert fwd == sorted([8, m * r * 4, n * r * 4, m * n * 4]), fwd
    else:
        assert fwd == [m * r * 4, m * n * 4], fwd
    assert bwd and max(bwd) <= max(m * r, r * k, n * r) * 4, bwd
    if ops._CPU_KERNELS:
        with dlcore.backend("cpu"):
            skinny = allocations(lambda: dlcore.lora_linear(x[:64], w, b, a, bl, 2.0))
        # out, xa (float32) and the float64 scaling passed to the kernel.
        assert skinny == [8, 64 * r * 4, 64 * n * 4], skinny


# ---- C++ CPU kernels (csrc/cpu/lora.cpp) -----------------------------------------------------

needs_cpu_kernels = pytest.mark.skipif(
    not ops._CPU_KERNELS, reason=f"dlcore._C LoRA kernels not built: {dlcore._ext.CPU_EXT_ERROR}"
)


def _kernel_inputs(m, k, n, r, n_ad, dtype, gen, strided=False):
    """x, weight, bias, A (n_ad, r, k), B (n_ad, n, r) as the (n_ad, r, n) storage's transposed
    view (LoRALinear's layout); with ``strided`` x and weight are row slices of wider buffers."""
    pad = 7 if strided else 0
    x = _rand(gen, m, k + pad, dtype=dtype)[:, :k]
    w = _rand(gen, n, k + pad, scale=k**-0.5, dtype=dtype)[:, :k]
    b = _rand(gen, n, dtype=dtype)
    a = _rand(gen, n_ad, r, k, scale=k**-0.5, dtype=dtype)
    bl = _rand(gen, n_ad, r, n, scale=r**-0.5, dtype=dtype).transpose(1, 2)
    return x, w, b, a, bl


def _multi_ref(x, w, b, a, bl, scal, idx):
    return ref.lora_linear_multi_reference(x, w, b, a, bl, scal.to(x.dtype), idx)


def _xa_ref(x, a, idx):
    """Each row's rank-r intermediate x A[idx]^T (0 for rows without an adapter)."""
    xa = torch.einsum("mk,mrk->mr", x, a[idx.long().clamp(min=0)])
    return xa * (idx >= 0)[:, None]


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "m,k,n,r,n_ad,bias,strided",
    [(1, 33, 17, 1, 1, True, False), (7, 45, 70, 16, 3, False, True),
     (64, 333, 517, 64, 4, True, True), (5, 16, 64, 256, 2, True, False),
     (40, 300, 97, 128, 1, True, True)],
)  # fmt: skip
def test_skinny_kernel_fills_poisoned_outputs(m, k, n, r, n_ad, bias, strided, dtype):
    """Odd in/out features (vector and weight-block tails), one to 64 tokens, strided rows, rows
    with adapter -1, one adapter (indices None, B (out, r) as peft stores it) and several (B a
    transposed (n, r, out) view, as LoRALinear stacks them); a rank-r phase big enough to be
    split across threads."""
    gen = torch.Generator().manual_seed(m * 1000 + k)
    x, w, b, a, bl = _kernel_inputs(m, k, n, r, n_ad, dtype, gen, strided)
    if n_ad == 1:
        bl = bl.contiguous()
    b = b if bias else None
    scal = torch.linspace(0.5, 2.0, n_ad)
    idx = torch.randint(-1, n_ad, (m,), generator=gen, dtype=torch.int32)
    idx[0] = -1 if n_ad > 1 else 0
    indices = idx if n_ad > 1 else None
    if indices is None:
        idx = torch.zeros(m, dtype=torch.int32)
    out, xa = poison_(torch.empty(m, n, dtype=dtype)), poison_(torch.empty(m, r))
    torch.ops.dlcore.lora_skinny_fwd_kernel(x, w, b, a, bl, scal, indices, out, xa)
    args64 = [t.double() if t is not None else None for t in (x, w, b, a, bl)]
    assert_parity(out, _multi_ref(*args64, scal, idx), _multi_ref(x, w, b, a, bl, scal, idx),
                  name="skinny out")  # fmt: skip
    assert_parity(xa, _xa_ref(args64[0], args64[3], idx), _xa_ref(x, a, idx), name="skinny xa")


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m,k,n,r,n_ad", [(50, 45, 70, 8, 3), (97, 130, 33, 100, 5)])
def test_multi_update_kernel_adds_each_rows_adapter(m, k, n, r, n_ad, dtype):
    """out (pre-filled) += each row's scaled update, unsorted indices with -1 rows; xa poisoned."""
    gen = torch.Generator().manual_seed(m)
    x, w, b, a, bl = _kernel_inputs(m, k, n, r, n_ad, dtype, gen, strided=True)
    scal = torch.linspace(0.5, 2.0, n_ad)
    idx = torch.randint(-1, n_ad, (m,), generator=gen, dtype=torch.int32)
    base = torch.nn.functional.linear(x, w, b)
    out, xa = base.clone(), poison_(torch.empty(m, r))
    torch.ops.dlcore.lora_multi_update_kernel(x, a, bl.transpose(1, 2), scal, idx, out, xa)
    args64 = [t.double() for t in (x, w, b, a, bl)]
    want64 = _multi_ref(*args64, scal, idx) - torch.nn.functional.linear(*args64[:3]) + base
    assert_parity(out, want64, _multi_ref(x, w, b, a, bl, scal, idx), name="multi update out")
    assert_parity(xa, _xa_ref(args64[0], args64[3], idx), _xa_ref(x, a, idx), name="update xa")


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("m,k,n,r,n_ad", [(50, 45, 70, 8, 3), (97, 130, 33, 100, 1)])
def test_multi_update_kernel_overwrite_starts_from_bias(m, k, n, r, n_ad, bias, dtype):
    """overwrite=True: every row of a poisoned out becomes bias (or 0) + its update, rows with
    adapter -1 just the bias; with one adapter the indices may be None."""
    gen = torch.Generator().manual_seed(m + 7)
    x, w, b, a, bl = _kernel_inputs(m, k, n, r, n_ad, dtype, gen, strided=True)
    b = b if bias else None
    scal = torch.linspace(0.5, 2.0, n_ad, dtype=torch.float64)
    idx = torch.randint(-1, n_ad, (m,), generator=gen, dtype=torch.int32)
    indices = idx
    if n_ad == 1:
        idx, indices = torch.zeros(m, dtype=torch.int32), None
    out, xa = poison_(torch.empty(m, n, dtype=dtype)), poison_(torch.empty(m, r))
    torch.ops.dlcore.lora_multi_update_kernel(
        x, a, bl.transpose(1, 2), scal, indices, out, xa, b, True
    )
    zero_w = torch.zeros_like(w)
    args64 = [t.double() if t is not None else None for t in (x, zero_w, b, a, bl)]
    want = _multi_ref(*args64, scal, idx)
    assert_parity(out, want, _multi_ref(x, zero_w, b, a, bl, scal, idx), name="overwrite out")
    assert_parity(xa, _xa_ref(args64[0], args64[3], idx), _xa_ref(x, a, idx), name="update xa")


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "m,k,n,r,strided",
    [(1, 5, 3, 1, False), (37, 333, 517, 5, True), (9, 64, 48, 16, False),
     (64, 100, 70, 33, True), (130, 47, 200, 64, True)],
)  # fmt: skip
def test_factor_grads_kernel_matches_blas(m, k, n, r, strided, dtype):
    """g = s dy B, dA = g^T x, dB = s dy^T xa for row counts that leave a partial row block,
    feature counts with vector tails, ranks of one to four vectors, strided dy/x and B."""
    gen = torch.Generator().manual_seed(m * 31 + r)
    pad = 3 if strided else 0
    x = _rand(gen, m, k + pad, dtype=dtype)[:, :k]
    dy = _rand(gen, m, n + pad, dtype=dtype)[:, :n]
    lora_b = _rand(gen, r + pad, n, dtype=dtype).t()[:, :r]  # (n, r), column-major
    xa = _rand(gen, m, r, dtype=torch.float32)
    s = 0.7
    g, da, db = (poison_(torch.empty(*shape, dtype=dtype)) for shape in ((m, r), (r, k), (n, r)))
    if r > ops._FACTOR_MAX_RANK[dtype]:  # past the kernel's registers: refused (BLAS path)
        with pytest.raises(RuntimeError, match=rf"r <= {ops._FACTOR_MAX_RANK[dtype]}, got"):
            torch.ops.dlcore.lora_factor_grads_kernel(dy, x, lora_b, xa, s, g, da, db)
        return
    torch.ops.dlcore.lora_factor_grads_kernel(dy, x, lora_b, xa, s, g, da, db)

    def want(dy, x, lora_b, xa):
        g = s * dy @ lora_b
        return g, g.t() @ x, s * dy.t() @ xa.to(dy.dtype)

    wants64 = want(dy.double(), x.double(), lora_b.double(), xa)
    wants = want(dy, x, lora_b, xa)
    for got, w64, wlp, name in zip((g, da, db), wants64, wants, ("g", "dA", "dB"), strict=True):
        assert_parity(got, w64, wlp, name=name)


@needs_cpu_kernels
def test_factor_grads_kernel_bad_input():
    k = torch.ops.dlcore.lora_factor_grads_kernel
    dy, x, lora_b, xa = torch.randn(6, 9), torch.randn(6, 20), torch.randn(9, 4), torch.randn(6, 4)
    g, da, db = torch.empty(6, 4), torch.empty(4, 20), torch.empty(9, 4)
    torch.library.opcheck(k.default, (dy, x, lora_b, xa, 0.5, g, da, db))
    with pytest.raises(RuntimeError, match=r"lora_B must be \(9, r\) of x's dtype with r <= 64"):
        k(dy, x, torch.randn(9, 65), xa, 0.5, g, da, db)
    with pytest.raises(RuntimeError, match=r"xa must be contiguous float32 \(6, 4\)"):
        k(dy, x, lora_b, xa.double(), 0.5, g, da, db)
    with pytest.raises(RuntimeError, match=r"dA must be contiguous \(4, 20\)"):
        k(dy, x, lora_b, xa, 0.5, g, da[:, :19], db)
    with pytest.raises(RuntimeError, match=r"dy \(tokens, out\) and x \(tokens, in\) must be"):
        k(dy[:5], x, lora_b, xa, 0.5, g, da, db)
    with pytest.raises(RuntimeError, match=r"must be float32 or float64"):
        k(dy.bfloat16(), x.bfloat16(), lora_b.bfloat16(), xa, 0.5, g, da, db)


@needs_cpu_kernels
def test_cpu_backend_reaches_the_kernels():
    """Up to 64 tokens the cpu backend runs lora_skinny_fwd_kernel; longer inputs run
    lora_multi_update_kernel (then the BLAS base GEMM), and the one-adapter backward
    lora_factor_grads_kernel; dropout uses BLAS."""
    from torch.profiler import ProfilerActivity, profile

    def kernels(fn):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        return {e.name for e in prof.events() if e.name.startswith("dlcore::lora_")} - {
            "dlcore::lora_linear", "dlcore::lora_linear_multi"}  # fmt: skip

    x, w, b, a, bl = _single_inputs((4, 8), 45, 70, 8, torch.float32)
    (xm, wm, bm, am, bml), scal, idx = _multi_inputs((65,), 45, 70, (8, 4), torch.float32)
    skinny, update = {"dlcore::lora_skinny_fwd_kernel"}, {"dlcore::lora_multi_update_kernel"}
    with dlcore.backend("cpu"):
        assert kernels(lambda: dlcore.lora_linear(x, w, b, a, bl, 2.0)) == skinny
        assert kernels(lambda: dlcore.lora_linear_multi(xm[:64], wm, bm, am, bml, scal,
                                                         idx[:64])) == skinny  # fmt: skip
        assert kernels(lambda: dlcore.lora_linear_multi(xm, wm, bm, am, bml, scal, idx)) == update
        assert kernels(lambda: dlcore.lora_linear(xm, wm, bm, a, bl, 2.0)) == update
        a.requires_grad_()
        out = dlcore.lora_linear(xm, wm, bm, a, bl, 2.0)
        grads = {"dlcore::lora_factor_grads_kernel"}
        assert kernels(lambda: out.backward(torch.ones_like(out))) == grads
        a.requires_grad_(False)
        assert not kernels(
            lambda: dlcore.lora_linear(x, w, b, a, bl, 2.0, dropout_p=0.1, training=True, seed=1)
        )


@needs_cpu_kernels
def test_gradcheck_skinny_path():
    tensors = _single_inputs((3,), 20, 9, 3, torch.float64, True)
    tensors = [t.requires_grad_() for t in tensors]
    with dlcore.backend("cpu"):
        assert torch.autograd.gradcheck(lambda *t: dlcore.lora_linear(*t, 0.7), tensors)


@needs_cpu_kernels
def test_cpu_kernels_opcheck_and_bad_input():
    gen = torch.Generator().manual_seed(5)
    x, w, b, a, bl = _kernel_inputs(6, 20, 9, 4, 2, torch.float32, gen)
    scal = torch.tensor([0.5, 2.0])
    idx = torch.tensor([0, -1, 1, 1, 0, -1], dtype=torch.int32)
    out, xa = torch.empty(6, 9), torch.empty(6, 4)
    skinny = torch.ops.dlcore.lora_skinny_fwd_kernel
    update = torch.ops.dlcore.lora_multi_update_kernel
    torch.library.opcheck(skinny.default, (x, w, b, a, bl, scal, idx, out, xa))
    torch.library.opcheck(skinny.default, (x, w, None, a[:1], bl[:1], scal[:1], None, out, xa))
    torch.library.opcheck(update.default, (x, a, bl.transpose(1, 2), scal, idx, out, xa))
    bad_idx = torch.tensor([0, -1, 2, 1, 0, -1], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"adapter index 2 of row 2 is out of range \[-1, 1\]"):
        skinny(x, w, b, a, bl, scal, bad_idx, out, xa)
    with pytest.raises(RuntimeError, match=r"adapter index 2 of row 2 is out of range"):
        update(x, a, bl.transpose(1, 2), scal, bad_idx, out, xa)
    with pytest.raises(RuntimeError, match=r"indices are required with 2 adapters"):
        skinny(x, w, b, a, bl, scal, None, out, xa)
    with pytest.raises(RuntimeError, match=r"xa must be contiguous float32 \(6, 4\)"):
        skinny(x, w, b, a, bl, scal, idx, out, xa[:, :3])
    with pytest.raises(RuntimeError, match=r"weight must be \(out, 20\)"):
        skinny(x, w[:, :19], b, a, bl, scal, idx, out, xa)
    with pytest.raises(RuntimeError, match=r"lora_B must be \(2, 9, 4\)"):
        skinny(x, w, b, a, bl[:, :8], scal, idx, out, xa)
    with pytest.raises(RuntimeError, match=r"out must be \(6, 9\)"):
        skinny(x, w, b, a, bl, scal, idx, out[:5], xa)
    with pytest.raises(RuntimeError, match=r"x must be float32 or float64, got BFloat16"):
        skinny(x.bfloat16(), w, b, a, bl, scal, idx, out, xa)
    with pytest.raises(RuntimeError, match=r"lora_B_t must be \(2, 4, out\)"):
        update(x, a, bl, scal, idx, out, xa)
    with pytest.raises(RuntimeError, match=r"scalings must be float32 or float64 \(2\)"):
        update(x, a, bl.transpose(1, 2), scal[:1], idx, out, xa)
