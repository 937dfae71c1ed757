"""Fused attention: parity of outputs, lse and dq/dk/dv with the float64 reference (DESIGN.md's
rule) on every backend (triton in interpreter mode, cpu when built, eager), for SDPA and
flash-attn semantics, masks, GQA/MQA, windows, ALiBi, softcap, varlen, kv cache and dropout."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import backends_for

import dlcore
from dlcore.backends import triton_kernels
from dlcore.ops import attention as ops
from dlcore.reference import attention as ref
from dlcore.testing import assert_parity, cast_floats, poison_

BACKENDS = backends_for("cpu", ("triton", "cpu", "eager"))


@pytest.fixture(params=BACKENDS)
def backend(request):
    with dlcore.backend(request.param):
        yield request.param


def _rand(*shape, dtype=torch.float32, gen=None):
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(dtype)


def _qkv(b, lq, lk, hq, hk, d, dtype, seed=0, layout="bshd", strided=False):
    """q/k/v in flash layout (B, L, H, D) or SDPA layout (B, H, L, D); ``strided`` returns views
    with a padded last dimension (unit stride but not contiguous)."""
    gen = torch.Generator().manual_seed(seed)
    pad = 3 if strided else 0
    shapes = [(b, lq, hq, d + pad), (b, lk, hk, d + pad), (b, lk, hk, d + pad)]
    ts = [_rand(*s, dtype=dtype, gen=gen)[..., :d] for s in shapes]
    if layout == "bhsd":
        ts = [t.transpose(1, 2) for t in ts]
    return ts


def _grads_of(fn, inputs, dout, *, extra=None):
    """(out, [lse], grads of inputs) of ``fn``; ``inputs`` are leaf copies made here."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    res = fn(*leaves)
    out = res[0] if isinstance(res, tuple) else res
    grads = torch.autograd.grad(out, leaves, dout.to(out.dtype))
    rest = tuple(r.detach() for r in res[1:]) if isinstance(res, tuple) else ()
    return (out.detach(), *rest, *grads)


def _assert_all(got, ref64, ref_lp, names):
    for g, r, rl, n in zip(got, ref64, ref_lp, names, strict=True):
        # Inputs are O(1): the floor is 8 eps of O(1) even where a reference is exactly 0 (dq of
        # a single visible key, whose softmax has zero gradient, gets rounding-level values).
        finite = r[torch.isfinite(r)]
        scale = max(float(finite.abs().max()) if finite.numel() else 0.0, 1.0)
        assert_parity(g, r, rl, name=n, floor=8 * torch.finfo(g.dtype).eps * scale)


def _flash_parity(q, k, v, dout, **kw):
    """dlcore.flash_attn_func vs flash_attn_reference: out, lse, dq, dk, dv."""
    det = kw.pop("deterministic", False)

    def run(q, k, v):
        out, lse, _ = dlcore.flash_attn_func(
            q, k, v, return_attn_probs=True, deterministic=det, **kw
        )
        return out, lse

    def reference(dtype):
        rkw = cast_floats(kw, dtype)
        return _grads_of(
            lambda q, k, v: ref.flash_attn_reference(q, k, v, **rkw),
            cast_floats([q, k, v], dtype),
            dout.to(dtype),
        )

    got = _grads_of(run, [q, k, v], dout)
    _assert_all(got, reference(torch.float64), reference(q.dtype), ("out", "lse", "dq", "dk", "dv"))
    return got


# (B, Lq, Lk, Hq, Hk, D, kwargs): odd sizes, length 1, GQA/MQA, both causal alignments.
FLASH_CASES = {
    "len1": (1, 1, 1, 1, 1, 16, {}),
    "113x203-gqa-d40": (2, 113, 203, 4, 2, 40, {}),
    "128x217-mqa-causal": (1, 128, 217, 2, 1, 64, {"causal": True}),
    "130x70-causal-emptyrows": (1, 130, 70, 2, 2, 32, {"causal": True, "deterministic": True}),
    "window": (1, 90, 100, 2, 2, 32, {"window_size": (17, 5)}),
    "window-left-causal": (1, 100, 90, 2, 1, 32, {"window_size": (9, -1), "causal": True}),
    "alibi-softcap": (2, 60, 75, 2, 2, 64, {"causal": True, "softcap": 3.0, "alibi": True}),
    "d80": (1, 33, 47, 2, 2, 80, {}),
}


@pytest.mark.parametrize("case", list(FLASH_CASES))
def test_flash_attn_parity(backend, case):
    b, lq, lk, hq, hk, d, kw = FLASH_CASES[case]
    kw = dict(kw)
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = torch.rand(b, hq) * 0.5
    q, k, v = _qkv(b, lq, lk, hq, hk, d, torch.float32, strided=case == "d80")
    dout = _rand(b, lq, hq, d, gen=torch.Generator().manual_seed(1))
    _flash_parity(q, k, v, dout, **kw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_flash_attn_parity_low_precision(backend, dtype):
    q, k, v = _qkv(2, 47, 71, 4, 2, 64, dtype)
    dout = _rand(2, 47, 4, 64, dtype=dtype, gen=torch.Generator().manual_seed(1))
    _flash_parity(q, k, v, dout, causal=True)


@pytest.mark.parametrize("d", [16, 40, 64, 80, 96, 128, 160, 256])
def test_head_dims(backend, d):
    if backend == "triton" and d > 64:
        pytest.skip("interpreter budget: D > 64 on triton runs in test_head_dims_triton_slow")
    q, k, v = _qkv(1, 19, 37, 2, 1, d, torch.float32)
    _flash_parity(q, k, v, _rand(1, 19, 2, d), causal=True)


@pytest.mark.slow
@pytest.mark.parametrize("d", [80, 96, 128, 160, 256])
def test_head_dims_triton_slow(d):
    with dlcore.backend("triton"):
        q, k, v = _qkv(1, 67, 93, 2, 1, d, torch.float32)
        _flash_parity(q, k, v, _rand(1, 67, 2, d), causal=True)


@pytest.mark.slow
@pytest.mark.parametrize("lq,lk", [(1023, 1024), (1024, 1023)])
@pytest.mark.parametrize("causal", [False, True])
def test_long_sequences_slow(backend, lq, lk, causal):
    q, k, v = _qkv(1, lq, lk, 2, 1, 64, torch.float32)
    _flash_parity(q, k, v, _rand(1, lq, 2, 64), causal=causal)


MASK_SHAPES = {
    "Lk": lambda b, h, lq, lk: (lk,),
    "LqLk": lambda b, h, lq, lk: (lq, lk),
    "HLqLk": lambda b, h, lq, lk: (h, lq, lk),
    "B1LqLk": lambda b, h, lq, lk: (b, 1, lq, lk),
    "B11Lk-padding": lambda b, h, lq, lk: (b, 1, 1, lk),
    "1H1Lk": lambda b, h, lq, lk: (1, h, 1, lk),
    "BHLqLk": lambda b, h, lq, lk: (b, h, lq, lk),
}


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("shape", list(MASK_SHAPES))
def test_sdpa_masks(backend, shape, kind):
    b, h, hk, lq, lk, d = 2, 4, 2, 37, 45, 32
    gen = torch.Generator().manual_seed(3)
    mshape = MASK_SHAPES[shape](b, h, lq, lk)
    if kind == "bool":
        mask = torch.rand(mshape, generator=gen) > 0.3
    else:
        mask = torch.randn(mshape, generator=gen)
        mask = mask.masked_fill(torch.rand(mshape, generator=gen) > 0.8, float("-inf"))
    q, k, v = _qkv(b, lq, lk, h, hk, d, torch.float32, layout="bhsd")
    dout = _rand(b, h, lq, d, gen=gen)
    got = _grads_of(
        lambda q, k, v: dlcore.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True),
        [q, k, v],
        dout,
    )

    def reference(dtype):
        fn = lambda q, k, v: ref.sdpa_reference(q, k, v, cast_floats(mask, dtype))
        return _grads_of(fn, cast_floats([q, k, v], dtype), dout.to(dtype))

    _assert_all(got, reference(torch.float64), reference(torch.float32), ("out", "dq", "dk", "dv"))
    assert torch.isfinite(got[0]).all() and all(torch.isfinite(g).all() for g in got[1:])


@pytest.mark.parametrize("lq,lk", [(23, 41), (41, 23), (1, 9)])
def test_sdpa_matches_torch_top_left_causal(backend, lq, lk):
    q, k, v = _qkv(2, lq, lk, 4, 4, 32, torch.float64, layout="bhsd")
    # torch SDPA in float64 is an independent reference for the top-left causal convention
    # (rows without a visible key excepted: torch gives NaN there, dlcore 0).
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    got = dlcore.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    assert_parity(got, want, ref.sdpa_reference(q.float(), k.float(), v.float(), is_causal=True))


def test_sdpa_gqa_matches_torch(backend):
    q, k, v = _qkv(1, 17, 29, 6, 2, 40, torch.float64, layout="bhsd")
    mask = torch.rand(17, 29) > 0.2
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True, scale=0.3)
    got = dlcore.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True, scale=0.3
    )
    same = ref.sdpa_reference(q.float(), k.float(), v.float(), mask, scale=0.3)
    assert_parity(got, want, same)


def test_sdpa_3d_inputs(backend):
    q, k, v = (_rand(3, 11, 16) for _ in range(3))
    got = dlcore.scaled_dot_product_attention(q, k, v, is_causal=True)
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    assert got.shape == q.shape
    assert_parity(got, want, F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_fully_masked_rows_give_zero_and_finite_grads(backend):
    b, h, lq, lk, d = 1, 2, 9, 13, 16
    mask = torch.rand(b, 1, lq, lk) > 0.5
    mask[:, :, [0, 4]] = False
    q, k, v = _qkv(b, lq, lk, h, h, d, torch.float32, layout="bhsd")
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = dlcore.scaled_dot_product_attention(*leaves, attn_mask=mask)
    assert torch.equal(out[:, :, [0, 4]], torch.zeros_like(out[:, :, [0, 4]]))
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves)
    assert torch.equal(leaves[0].grad[:, :, [0, 4]], torch.zeros_like(leaves[0].grad[:, :, [0, 4]]))
    _, lse, _ = dlcore.flash_attn_func(
        *(t.transpose(1, 2) for t in (q, k, v)),
        attn_bias=mask,
        return_attn_probs=True,
    )
    assert torch.isneginf(lse[:, :, [0, 4]]).all() and torch.isfinite(lse[:, :, [1, 2]]).all()


def test_flash_attn_bias_and_probs(backend):
    b, lq, lk, h, d = 2, 21, 34, 2, 32
    q, k, v = _qkv(b, lq, lk, h, h, d, torch.float32)
    bias = _rand(1, h, lq, lk, gen=torch.Generator().manual_seed(5))
    dout = _rand(b, lq, h, d)
    _flash_parity(q, k, v, dout, attn_bias=bias, causal=True)
    _, _, probs = dlcore.flash_attn_func(q, k, v, attn_bias=bias, return_attn_probs=True)
    want = ref.attention_probs(*(t.transpose(1, 2).double() for t in (q, k)), bias.double())
    assert_parity(probs, want, ref.attention_probs(q.transpose(1, 2), k.transpose(1, 2), bias))


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


@pytest.mark.parametrize(
    "kw",
    [{}, {"causal": True}, {"window_size": (6, 3), "alibi": True, "softcap": 4.0}],
    ids=["full", "causal", "window-alibi-softcap"],
)
def test_varlen_parity(backend, kw):
    kw = dict(kw)
    lens_q, lens_k = [17, 1, 40, 3], [23, 1, 33, 0]
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    hq, hk, d = 4, 2, 32
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = torch.rand(len(lens_q), hq)
    gen = torch.Generator().manual_seed(7)
    q = _rand(sum(lens_q), hq, d, gen=gen)
    k, v = (_rand(sum(lens_k), hk, d, gen=gen) for _ in range(2))
    dout = _rand(*q.shape, gen=gen)

    def run(q, k, v):
        out, lse, _ = dlcore.flash_attn_varlen_func(
            q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), return_attn_probs=True, **kw
        )
        return out, lse

    def reference(dtype):
        rkw = cast_floats(kw, dtype)
        fn = lambda q, k, v: ref.flash_attn_varlen_reference(q, k, v, cu_q, cu_k, **rkw)
        return _grads_of(fn, cast_floats([q, k, v], dtype), dout.to(dtype))

    got = _grads_of(run, [q, k, v], dout)
    names = ("out", "lse", "dq", "dk", "dv")
    _assert_all(got, reference(torch.float64), reference(torch.float32), names)
    # The sequence with no keys attends to nothing: zeros, lse = -inf.
    assert torch.equal(got[0][-3:], torch.zeros_like(got[0][-3:]))
    assert torch.isneginf(got[1][:, -3:]).all()


def _rotary_reference(x, cos, sin, pos, interleaved):
    """Rotary embedding through complex multiplication (independent of dlcore's real form)."""
    rd = 2 * cos.shape[-1]
    x = x.double()
    rot = x[..., :rd]
    if interleaved:
        pairs = torch.view_as_complex(rot.reshape(*rot.shape[:-1], rd // 2, 2).contiguous())
    else:
        pairs = torch.complex(rot[..., : rd // 2], rot[..., rd // 2 :])
    phase = torch.polar(
        torch.ones_like(cos[pos].double()), torch.atan2(sin[pos], cos[pos]).double()
    )
    turned = pairs * phase[:, :, None]
    if interleaved:
        rot = torch.view_as_real(turned).flatten(-2)
    else:
        rot = torch.cat((turned.real, turned.imag), dim=-1)
    return torch.cat((rot, x[..., rd:]), dim=-1)


@pytest.mark.parametrize("lq", [1, 5])
@pytest.mark.parametrize("interleaved", [True, False])
def test_kvcache_append_rotary_and_parity(backend, lq, interleaved):
    b, lmax, hq, hk, d = 3, 90, 4, 2, 32
    gen = torch.Generator().manual_seed(11)
    k_cache, v_cache = (_rand(b + 1, lmax, hk, d, gen=gen) for _ in range(2))
    q = _rand(b, lq, hq, d, gen=gen)
    k_new, v_new = (_rand(b, lq, hk, d, gen=gen) for _ in range(2))
    seqlens = torch.tensor([10, 84, 0], dtype=torch.int32)
    rows = torch.tensor([3, 0, 1], dtype=torch.int32)
    angles = torch.rand(lmax, 8, generator=gen) * 6
    cos, sin = angles.cos(), angles.sin()
    kc, vc = k_cache.clone(), v_cache.clone()
    out, lse = dlcore.flash_attn_with_kvcache(
        q, kc, vc, k_new, v_new, rotary_cos=cos, rotary_sin=sin, cache_seqlens=seqlens,
        cache_batch_idx=rows, causal=True, rotary_interleaved=interleaved,
        return_softmax_lse=True,
    )  # fmt: skip
    # In-place append of the rotated keys and the values at cache_seqlens; nothing else moved.
    pos = seqlens.long()[:, None] + torch.arange(lq)
    want_k = k_cache.clone().double()
    want_k[rows.long()[:, None], pos] = _rotary_reference(k_new, cos, sin, pos, interleaved)
    want_v = v_cache.clone()
    want_v[rows.long()[:, None], pos] = v_new
    torch.testing.assert_close(kc.double(), want_k, rtol=0, atol=1e-6)
    assert torch.equal(vc, want_v)
    q_rot = _rotary_reference(q, cos, sin, pos, interleaved)
    ref_k, ref_v = want_k[rows.long()], want_v.double()[rows.long()]
    r64 = ref.flash_attn_kvcache_reference(q_rot, ref_k, ref_v, seqlens + lq, causal=True)
    r32 = ref.flash_attn_kvcache_reference(
        q_rot.float(), ref_k.float(), ref_v.float(), seqlens + lq, causal=True
    )
    _assert_all((out, lse), r64, r32, ("out", "lse"))


@pytest.mark.parametrize("num_splits", [1, 3, 0])
def test_kvcache_split_kv_features(backend, num_splits):
    b, lmax, hq, hk, d = 2, 150, 4, 1, 64
    gen = torch.Generator().manual_seed(12)
    kc, vc = (_rand(b, lmax, hk, d, gen=gen) for _ in range(2))
    q = _rand(b, 1, hq, d, gen=gen)
    seqlens = torch.tensor([150, 61], dtype=torch.int32)
    slopes = torch.rand(hq)
    kw = {"softcap": 2.5, "window_size": (40, 0)}
    out, lse = dlcore.flash_attn_with_kvcache(
        q, kc, vc, cache_seqlens=seqlens, alibi_slopes=slopes, num_splits=num_splits,
        return_softmax_lse=True, **kw,
    )  # fmt: skip
    r64 = ref.flash_attn_kvcache_reference(
        q.double(), kc.double(), vc.double(), seqlens, alibi_slopes=slopes.double(), **kw
    )
    r32 = ref.flash_attn_kvcache_reference(q, kc, vc, seqlens, alibi_slopes=slopes, **kw)
    _assert_all((out, lse), r64, r32, ("out", "lse"))


def _dropout_mask(fn_kw, b, h, lq, lk, p, seed):
    """The keep mask a backend draws, read through attention with V = identity: out[i, j] is
    P_ij * keep_ij / (1 - p), and P_ij > 0 everywhere without masking."""
    q, k, _ = _qkv(b, lq, lk, h, h, lk, torch.float32, seed=5)
    eye = torch.eye(lk).expand(b, h, lk, lk).transpose(1, 2).contiguous()
    torch.manual_seed(seed)
    out = dlcore.flash_attn_func(q, k, eye, dropout_p=p, **fn_kw)
    return out.transpose(1, 2) != 0


def test_dropout_mask_fraction_and_seeding(backend):
    p = 0.3
    keep = _dropout_mask({}, 2, 2, 40, 64, p, seed=123)
    frac = keep.float().mean().item()
    assert abs(frac - (1 - p)) < 0.03, frac
    assert torch.equal(keep, _dropout_mask({}, 2, 2, 40, 64, p, seed=123))
    assert not torch.equal(keep, _dropout_mask({}, 2, 2, 40, 64, p, seed=124))
    # Rows and heads draw different masks (the counter includes b, h, i, j).
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0, 0], keep[0, 0, 1])


@pytest.mark.parametrize("causal", [False, True])
def test_dropout_forward_backward_consistency(backend, causal):
    b, h, lq, lk, d, p = 1, 2, 29, 48, 64, 0.25
    keep = _dropout_mask({"causal": causal}, b, h, lq, lk, p, seed=7)
    q, k, v = _qkv(b, lq, lk, h, h, d, torch.float32, seed=9)
    dout = _rand(b, lq, h, d)

    def run(q, k, v):
        torch.manual_seed(7)
        return dlcore.flash_attn_func(q, k, v, dropout_p=p, causal=causal)

    def reference(dtype):
        fn = lambda q, k, v: ref.flash_attn_reference(
            q, k, v, causal=causal, dropout_p=p, keep_mask=keep
        )[0]
        return _grads_of(fn, cast_floats([q, k, v], dtype), dout.to(dtype))

    got = _grads_of(run, [q, k, v], dout)
    _assert_all(got, reference(torch.float64), reference(torch.float32), ("out", "dq", "dk", "dv"))


def test_deterministic_gradients_bitwise(backend):
    q, k, v = _qkv(1, 70, 90, 4, 2, 32, torch.float32)
    dout = _rand(1, 70, 4, 32)
    runs = [
        _grads_of(
            lambda q, k, v: dlcore.flash_attn_func(q, k, v, causal=True, deterministic=True),
            [q, k, v],
            dout,
        )
        for _ in range(2)
    ]
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def test_gradcheck_float64_eager():
    gen = torch.Generator().manual_seed(0)
    q = _rand(1, 2, 5, 4, dtype=torch.float64, gen=gen).requires_grad_()
    k, v = (_rand(1, 1, 7, 4, dtype=torch.float64, gen=gen).requires_grad_() for _ in range(2))
    bias = _rand(5, 7, dtype=torch.float64, gen=gen)
    slopes = torch.rand(1, 2, dtype=torch.float64, generator=gen).float()
    with dlcore.backend("eager"):
        fn = lambda q, k, v: ops.attention_fwd(
            q, k, v, bias.expand(1, 2, 5, 7).float(), slopes, 0.7, 2, 3, 1, 1.5, 0.0, 0, False
        )[0]
        assert torch.autograd.gradcheck(fn, (q, k, v))


def test_opcheck_ops():
    q, k, v = _qkv(1, 9, 13, 2, 1, 16, torch.float32, layout="bhsd")
    bias = torch.randn(1, 1, 9, 13).expand(1, 2, 9, 13)
    fwd_args = (q, k, v, bias, torch.rand(1, 2), 0.25, 4, 5, 0, 2.0, 0.0, 0, True)
    torch.library.opcheck(ops.attention_fwd, fwd_args)
    out, lse = ops.attention_fwd(*fwd_args)
    bwd_args = (torch.randn_like(out), q, k, v, out, lse, *fwd_args[3:])
    torch.library.opcheck(ops.attention_bwd, bwd_args)
    cu = _cu([4, 5])
    qp, kp, vp = (_rand(9, 2, 16) for _ in range(3))
    var_args = (qp, kp, vp, cu, cu, 5, 5, None, 0.25, -1, 0, 0.0, 0.0, 0, False)
    torch.library.opcheck(ops.attention_varlen_fwd, var_args)
    vout, vlse = ops.attention_varlen_fwd(*var_args)
    torch.library.opcheck(
        ops.attention_varlen_bwd, (torch.randn_like(vout), qp, kp, vp, vout, vlse, *var_args[3:])
    )
    kc, vc = (_rand(2, 12, 1, 16) for _ in range(2))
    kv_args = (_rand(2, 1, 2, 16), kc, vc, torch.tensor([12, 5], dtype=torch.int32), None)
    torch.library.opcheck(ops.attention_kvcache, (*kv_args, None, 0.25, -1, -1, 0.0, 0))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    def block(q, k, v, mask):
        return dlcore.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum(-1).tanh()

    q, k, v = (t.requires_grad_() for t in _qkv(2, 11, 13, 2, 2, 16, torch.float32, layout="bhsd"))
    mask = torch.rand(11, 13) > 0.3
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    got = compiled(q, k, v, mask)
    want = block(q, k, v, mask)
    torch.testing.assert_close(got, want)
    g_got = torch.autograd.grad(got.sum(), (q, k, v))
    g_want = torch.autograd.grad(want.sum(), (q, k, v))
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b)
    torch._dynamo.reset()


def test_inference_call_skips_the_op_wrapper_with_the_same_result(backend, monkeypatch):
    """Without autograd or tracing the forward runs the op's body directly (no custom-op
    bookkeeping); with a tensor requiring grad it goes through the op. Same numbers both ways."""
    q, k, v = _qkv(2, 37, 53, 4, 2, 24, torch.float32, seed=3)
    mask = torch.rand(2, 1, 37, 53, generator=torch.Generator().manual_seed(4)) > 0.2
    calls = []
    op = ops.attention_fwd
    monkeypatch.setattr(ops, "attention_fwd", lambda *a: calls.append(1) or op(*a))
    with torch.no_grad():
        flash = dlcore.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)[:2]
        sdpa = dlcore.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)),
                                                   attn_mask=mask, enable_gqa=True)  # fmt: skip
    assert calls == []
    want_flash = op(*(t.transpose(1, 2) for t in (q, k, v)), None, None, 24**-0.5, 53 - 37,
                    -1, 0, 0.0, 0.0, 0, False)  # fmt: skip
    bias = torch.zeros(mask.shape).masked_fill_(~mask, float("-inf")).expand(2, 4, 37, 53)
    want_sdpa = op(*(t.transpose(1, 2) for t in (q, k, v)), bias, None, 24**-0.5, 0, -1, -1,
                   0.0, 0.0, 0, False)[0]  # fmt: skip
    assert torch.equal(flash[0], want_flash[0].transpose(1, 2))
    assert torch.equal(flash[1], want_flash[1])
    assert torch.equal(sdpa, want_sdpa)
    dlcore.flash_attn_func(q.requires_grad_(), k, v, causal=True)
    assert calls == [1]


def test_meta_tensors():
    q, k, v = (torch.empty(2, 7, 4, 64, device="meta") for _ in range(3))
    out = dlcore.flash_attn_func(q, k, v, causal=True)
    assert out.shape == (2, 7, 4, 64) and out.device.type == "meta"


@pytest.mark.parametrize("impl", backends_for("cpu", ("triton", "cpu")))
def test_kernel_contract_writes_every_output(impl):
    """The kernel layer itself (Triton launcher / C++ op) fills NaN-poisoned outputs."""
    b, hq, hk, lq, lk, d = 2, 4, 2, 37, 53, 40
    q, k, v = _qkv(b, lq, lk, hq, hk, d, torch.float32, layout="bhsd")
    out, lse = poison_(torch.empty(b, hq, lq, d)), poison_(torch.empty(b, hq, lq))
    args = (q, k, v, None, None, 0.2, lk - lq, -1, 0, 0.0, 0.0, 0)
    if impl == "triton":
        triton_kernels("attention").attention_fwd(*args, out, lse)
    else:
        torch.ops.dlcore.attention_fwd_kernel(*args, out, lse)
    r64 = ref.attention_reference(
        *cast_floats(args[:3], torch.float64), None, None, 0.2, lk - lq, -1, 0
    )
    r32 = ref.attention_reference(*args[:3], None, None, 0.2, lk - lq, -1, 0)
    _assert_all((out, lse), r64, r32, ("out", "lse"))
    dout = _rand(b, hq, lq, d)
    grads = [poison_(torch.empty_like(t)) for t in (q, k, v)]
    bwd = (dout, q, k, v, out, lse, None, None, 0.2, lk - lq, -1, 0, 0.0, 0.0, 0, True, *grads)
    if impl == "triton":
        triton_kernels("attention").attention_bwd(*bwd)
    else:
        torch.ops.dlcore.attention_bwd_kernel(*bwd)
    for g in grads:
        assert torch.isfinite(g).all()


BAD_INPUTS = [
    (
        "rank",
        lambda: dlcore.flash_attn_func(
            torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4)
        ),
        r"q must have 4 dimensions \(batch, seqlen, nheads, head_dim\), got shape \(2, 3, 4\)",
    ),
    (
        "batch",
        lambda: dlcore.flash_attn_func(torch.randn(2, 5, 4, 8), *[torch.randn(3, 5, 4, 8)] * 2),
        r"k and v must have the same shape with q's batch size, got q \(2, 5, 4, 8\)",
    ),
    (
        "heads",
        lambda: dlcore.flash_attn_func(torch.randn(1, 5, 6, 8), *[torch.randn(1, 5, 4, 8)] * 2),
        r"q has 6 heads, which is not a multiple of the 4 heads of k/v",
    ),
    (
        "head-dim-mismatch",
        lambda: dlcore.flash_attn_func(torch.randn(1, 5, 4, 8), *[torch.randn(1, 5, 4, 16)] * 2),
        r"head dims differ: q \(1, 5, 4, 8\), k \(1, 5, 4, 16\)",
    ),
    (
        "head-dim-too-large",
        lambda: dlcore.flash_attn_func(*[torch.randn(1, 5, 2, 288)] * 3),
        r"head dim of q must be in \[1, 256\], got 288",
    ),
    (
        "sdpa-gqa-flag",
        lambda: dlcore.scaled_dot_product_attention(
            torch.randn(1, 4, 5, 8), *[torch.randn(1, 2, 5, 8)] * 2
        ),
        r"query has 4 heads but key/value have 2 .*pass enable_gqa=True",
    ),
    (
        "mask-not-broadcastable",
        lambda: dlcore.scaled_dot_product_attention(
            *[torch.randn(2, 2, 5, 8)] * 3, attn_mask=torch.ones(3, 5, 5, dtype=torch.bool)
        ),
        r"attn_mask of shape \(3, 5, 5\) is not broadcastable to the attention scores "
        r"\(batch, heads, L_q, L_k\) = \(2, 2, 5, 5\)",
    ),
    (
        "mask-and-causal",
        lambda: dlcore.scaled_dot_product_attention(
            *[torch.randn(1, 2, 5, 8)] * 3, attn_mask=torch.ones(5, 5), is_causal=True
        ),
        r"pass either attn_mask or is_causal=True, not both",
    ),
    (
        "window-negative",
        lambda: dlcore.flash_attn_func(*[torch.randn(1, 5, 2, 8)] * 3, window_size=(-3, 2)),
        r"window_size entries must be >= 0 or -1 \(unbounded\), got \(-3, 2\)",
    ),
    (
        "window-right-with-causal",
        lambda: dlcore.flash_attn_func(
            *[torch.randn(1, 5, 2, 8)] * 3, causal=True, window_size=(4, 2)
        ),
        r"causal=True sees no key right of the diagonal, but window_size=\(4, 2\)",
    ),
    (
        "dtype-mismatch",
        lambda: dlcore.flash_attn_func(
            torch.randn(1, 5, 2, 8), torch.randn(1, 5, 2, 8).half(), torch.randn(1, 5, 2, 8)
        ),
        r"q, k, v must share a dtype, got float32, float16, float32",
    ),
    (
        "alibi-shape",
        lambda: dlcore.flash_attn_func(*[torch.randn(1, 5, 2, 8)] * 3, alibi_slopes=torch.ones(3)),
        r"alibi_slopes must have shape \(2,\) or \(1, 2\) \(nheads of q\), got \(3,\)",
    ),
    (
        "cu-seqlens-dtype",
        lambda: dlcore.flash_attn_varlen_func(
            *[torch.randn(9, 2, 8)] * 3, torch.tensor([0, 9]), torch.tensor([0, 9]), 9, 9
        ),
        r"cu_seqlens_q must be a 1-D int32 tensor \(batch \+ 1,\), got \(2,\) int64",
    ),
    (
        "max-seqlen-too-small",
        lambda: dlcore.flash_attn_varlen_func(
            *[torch.randn(9, 2, 8)] * 3, _cu([4, 5]), _cu([4, 5]), 4, 5
        ),
        r"max_seqlen_q=4 is smaller than the longest sequence \(5\)",
    ),
    (
        "kvcache-overflow",
        lambda: dlcore.flash_attn_with_kvcache(
            torch.randn(1, 1, 2, 8),
            *[torch.zeros(1, 6, 2, 8)] * 2,
            *[torch.randn(1, 2, 2, 8)] * 2,
            cache_seqlens=5,
        ),
        r"cache_seqlens \+ 2 new keys must fit the cache length 6, got cache_seqlens \[5\]",
    ),
    (
        "dropout-range",
        lambda: dlcore.flash_attn_func(*[torch.randn(1, 5, 2, 8)] * 3, dropout_p=1.0),
        r"dropout_p must be in \[0, 1\), got 1.0",
    ),
]


@pytest.mark.parametrize("name,call,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_raise_clear_errors(name, call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_backend_reporting_and_cpu_registration():
    impl = ops.implemented_backends()
    assert impl[0] == "triton" and impl[-1] == "eager"
    has_cpu = (
        torch._C._dispatch_has_kernel_for_dispatch_key("dlcore::attention_fwd_kernel", "CPU")
        if dlcore.backends()["cpu"].available
        else False
    )
    assert ("cpu" in impl) == has_cpu
    assert math.isclose(ops._scale(None, 64), 0.125)


@pytest.mark.parametrize("shape", [(13, 17), (2, 1, 13, 17), (3, 1, 17)], ids=str)
def test_learnable_bias_gradient(backend, shape):
    """A float mask that requires grad (e.g. a learned relative-position bias) gets dL/dbias
    summed over its broadcast dimensions, like torch SDPA."""
    gen = torch.Generator().manual_seed(21)
    q, k, v = _qkv(2, 13, 17, 3, 3, 16, torch.float32, layout="bhsd")
    bias = _rand(*shape, gen=gen)
    dout = _rand(2, 3, 13, 16, gen=gen)
    got = _grads_of(
        lambda q, k, v, bias: dlcore.scaled_dot_product_attention(q, k, v, attn_mask=bias),
        [q, k, v, bias],
        dout,
    )

    def reference(dtype):
        return _grads_of(ref.sdpa_reference, cast_floats([q, k, v, bias], dtype), dout.to(dtype))

    names = ("out", "dq", "dk", "dv", "dbias")
    _assert_all(got, reference(torch.float64), reference(torch.float32), names)


def test_learnable_bias_with_dropout_is_refused():
    q = torch.randn(1, 2, 5, 8)
    bias = torch.randn(5, 5, requires_grad=True)
    with pytest.raises(ValueError, match=r"attn_mask requires a gradient, which dlcore computes"):
        dlcore.scaled_dot_product_attention(q, q, q, attn_mask=bias, dropout_p=0.1)
