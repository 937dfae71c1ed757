"""The C++ CPU attention kernels (csrc/cpu/attention.cpp) called directly through
torch.ops.dlcore.attention_{fwd,bwd}_kernel, against the float64 eager reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import dlcore
from dlcore.reference.attention import attention_reference
from dlcore.testing import assert_parity, poison_

pytestmark = pytest.mark.skipif(
    dlcore._ext.CPU_EXT_ERROR is not None, reason=f"{dlcore._ext.CPU_EXT_ERROR}"
)


def run_forward(
    q, k, v, *, bias=None, alibi=None, scale=None, diag=0, wl=-1, wr=-1, softcap=0.0, p=0.0, seed=0
):
    b, hq, lq, d = q.shape
    out = poison_(torch.empty_like(q))
    lse = poison_(torch.empty(b, hq, lq))
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    torch.ops.dlcore.attention_fwd_kernel(
        q, k, v, bias, alibi, scale, diag, wl, wr, softcap, p, seed, out, lse
    )
    return out, lse


def run_backward(
    dout,
    q,
    k,
    v,
    out,
    lse,
    *,
    bias=None,
    alibi=None,
    scale=None,
    diag=0,
    wl=-1,
    wr=-1,
    softcap=0.0,
    p=0.0,
    seed=0,
    deterministic=False,
):
    dq, dk, dv = (poison_(torch.empty_like(t)) for t in (q, k, v))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    torch.ops.dlcore.attention_bwd_kernel(
        dout,
        q,
        k,
        v,
        out,
        lse,
        bias,
        alibi,
        scale,
        diag,
        wl,
        wr,
        softcap,
        p,
        seed,
        deterministic,
        dq,
        dk,
        dv,
    )
    return dq, dk, dv


def reference(
    q,
    k,
    v,
    dout,
    dtype,
    *,
    bias=None,
    alibi=None,
    scale=None,
    diag=0,
    wl=-1,
    wr=-1,
    softcap=0.0,
    p=0.0,
    keep=None,
):
    """(out, lse, dq, dk, dv) of the eager reference computed in ``dtype``."""
    qd, kd, vd = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out, lse = attention_reference(
        qd,
        kd,
        vd,
        bias=None if bias is None else bias.to(dtype),
        alibi_slopes=alibi,
        scale=scale,
        diag_offset=diag,
        window_left=wl,
        window_right=wr,
        softcap=softcap,
        dropout_p=p,
        keep_mask=keep,
    )
    out.backward(dout.to(dtype))
    return out.detach(), lse.detach(), qd.grad, kd.grad, vd.grad


def philox_uniform(seed: int, offsets: np.ndarray) -> np.ndarray:
    """Triton's tl.rand(seed, offsets) for int64 offsets (Philox4x32-10), in exact uint64 math."""
    m32 = np.uint64(0xFFFFFFFF)
    off = offsets.astype(np.uint64)
    c0, c1 = off & m32, off >> np.uint64(32)
    c2 = np.zeros_like(c0)
    c3 = np.zeros_like(c0)
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64((seed >> 32) & 0xFFFFFFFF)
    round_a, round_b = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    for _ in range(10):
        a, b = c0, c2
        c0 = ((round_b * b) >> np.uint64(32)) ^ c1 ^ k0
        c2 = ((round_a * a) >> np.uint64(32)) ^ c3 ^ k1
        c1 = (round_b * b) & m32
        c3 = (round_a * a) & m32
        k0 = (k0 + np.uint64(0x9E3779B9)) & m32
        k1 = (k1 + np.uint64(0xBB67AE85)) & m32
    x = c0.astype(np.uint32).view(np.int32)
    x = np.where(x < 0, ~x, x)
    return x.astype(np.float32) * np.float32(4.6566127342e-10)


def keep_mask(seed: int, p: float, b: int, h: int, lq: int, lk: int) -> torch.Tensor:
    """The kernel's dropout keep mask: offset ((b*H + h)*Lq + i)*Lk + j."""
    u = philox_uniform(seed, np.arange(b * h * lq * lk, dtype=np.int64))
    return torch.from_numpy(u > np.float32(p)).view(b, h, lq, lk)


def make_qkv(b, hq, hk, lq, lk, d, dtype, flash_layout=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    if flash_layout:  # (B, L, H, D) storage seen as a permuted (B, H, L, D) view
        shapes = [(b, lq, hq, d), (b, lk, hk, d), (b, lk, hk, d)]
        return [torch.randn(s, generator=g).to(dtype).transpose(1, 2) for s in shapes]
    shapes = [(b, hq, lq, d), (b, hk, lk, d), (b, hk, lk, d)]
    return [torch.randn(s, generator=g).to(dtype) for s in shapes]


def check_case(b, hq, hk, lq, lk, d, dtype, flash_layout=False, **opts):
    q, k, v = make_qkv(b, hq, hk, lq, lk, d, dtype, flash_layout)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    out, lse = run_forward(q, k, v, **opts)
    dq, dk, dv = run_backward(dout, q, k, v, out, lse, **opts)
    ref_opts = {key: val for key, val in opts.items() if key not in ("seed",)}
    keep = None
    if opts.get("p", 0.0) > 0:
        keep = keep_mask(opts.get("seed", 0), opts["p"], b, hq, lq, lk)
    ref64 = reference(q, k, v, dout, torch.float64, keep=keep, **ref_opts)
    ref_lp = reference(q, k, v, dout, dtype, keep=keep, **ref_opts)
    names = ("out", "lse", "dq", "dk", "dv")
    for name, actual, r64, rlp in zip(names, (out, lse, dq, dk, dv), ref64, ref_lp, strict=True):
        # lse is float32 whatever the input dtype; its same-dtype reference is the fp32 one.
        if name == "lse":
            rlp = None if dtype == torch.float64 else rlp.float()
        assert_parity(actual, r64, rlp, name=f"{name} {dtype}")


CASES = [
    pytest.param((1, 1, 1, 1, 1, 16), {}, id="len1"),
    pytest.param((2, 4, 2, 113, 203, 40), {}, id="gqa-113x203-d40"),
    pytest.param((1, 4, 1, 128, 217, 80), {"wr": 0}, id="mqa-causal-topleft-d80"),
    pytest.param((1, 2, 2, 113, 203, 64), {"wr": 0, "diag": 90}, id="causal-bottomright"),
    pytest.param((1, 2, 2, 203, 113, 96), {"wr": 0, "diag": -90}, id="causal-lq>lk-emptyrows"),
    pytest.param((1, 2, 1, 100, 130, 128), {"wl": 17, "wr": 5, "diag": 30}, id="window-d128"),
    pytest.param((1, 2, 2, 70, 90, 16), {"wl": 20, "diag": 20}, id="window-left-only"),
    pytest.param((2, 3, 3, 67, 150, 64), {"softcap": 1.5}, id="softcap"),
    pytest.param((1, 2, 2, 20, 500, 160), {}, id="d160-longkeys"),
    pytest.param((2, 2, 1, 33, 65, 256), {"wr": 0, "diag": 32}, id="d256-causal"),
    pytest.param((3, 2, 2, 19, 23, 7), {}, id="d7-odd"),
    pytest.param((2, 4, 1, 3, 300, 64), {"wr": 0, "diag": 297}, id="decode-3rows"),
    pytest.param((1, 2, 2, 65, 100, 40), {"wr": 0, "diag": 35}, id="1-row-last-block-d40"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,opts", CASES)
def test_parity(shape, opts, dtype):
    check_case(*shape, dtype, **opts)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_parity_other_dtypes(dtype):
    check_case(2, 4, 2, 65, 130, 80, dtype, wr=0, diag=65)


def test_flash_layout_strided_inputs():
    check_case(2, 4, 2, 77, 100, 64, torch.float32, flash_layout=True, wr=0, diag=23)
    check_case(2, 4, 2, 2, 100, 64, torch.float32, flash_layout=True, wr=0, diag=98)


def test_alibi_batch_and_broadcast_slopes():
    b, h = 2, 4
    slopes = torch.rand(b, h)
    check_case(b, h, 2, 50, 80, 32, torch.float32, alibi=slopes, wr=0, diag=30)
    check_case(b, h, h, 50, 80, 32, torch.bfloat16, alibi=torch.rand(1, h).expand(b, h))


@pytest.mark.parametrize(
    "bias_shape",
    [(1, 1, 37, 81), (2, 1, 1, 81), (1, 3, 37, 1), (2, 3, 37, 81), (1, 1, 1, 1)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_bias_broadcast_shapes(bias_shape):
    g = torch.Generator().manual_seed(3)
    bias = torch.randn(bias_shape, generator=g)
    bias = bias.masked_fill(torch.rand(bias_shape, generator=g) < 0.2, float("-inf"))
    check_case(2, 3, 3, 37, 81, 24, torch.float32, bias=bias.expand(2, 3, 37, 81))


@pytest.mark.parametrize("bias_dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_bias_dtypes(bias_dtype):
    bias = torch.randn(1, 2, 30, 70).to(bias_dtype)
    check_case(1, 2, 2, 30, 70, 32, torch.float32, bias=bias)


def test_fully_masked_rows_give_zero_not_nan():
    b, h, lq, lk, d = 1, 2, 70, 90, 32
    bias = torch.zeros(b, h, lq, lk)
    bias[:, :, 5] = float("-inf")  # row 5 sees nothing
    bias[:, 1, 64:] = float("-inf")  # a whole second query block of head 1
    q, k, v = make_qkv(b, h, h, lq, lk, d, torch.float32)
    out, lse = run_forward(q, k, v, bias=bias)
    assert torch.all(out[:, :, 5] == 0) and torch.all(lse[:, :, 5] == float("-inf"))
    assert torch.all(out[:, 1, 64:] == 0) and torch.all(lse[:, 1, 64:] == float("-inf"))
    dq, dk, dv = run_backward(torch.randn_like(q), q, k, v, out, lse, bias=bias)
    assert torch.all(dq[:, :, 5] == 0)
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()
    check_case(b, h, h, lq, lk, d, torch.float32, bias=bias)


def test_empty_key_sequence():
    q, k, v = make_qkv(2, 2, 2, 5, 0, 16, torch.float32)
    out, lse = run_forward(q, k, v)
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))
    dq, dk, dv = run_backward(torch.randn_like(q), q, k, v, out, lse)
    assert torch.all(dq == 0) and dk.numel() == 0


def test_dropout_stream_is_tritons_tl_rand():
    """The numpy Philox used to rebuild the kernel's mask is Triton's tl.rand."""
    if not dlcore.backends()["triton"].available:
        pytest.skip("triton unavailable")
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("tl.rand on CPU tensors needs the Triton interpreter")
    import triton
    import triton.language as tl

    @triton.jit
    def rand_kernel(out_ptr, seed, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        tl.store(out_ptr + offs, tl.rand(seed, offs), mask=offs < n)

    seed, n = 2**40 + 12345, 1000
    out = torch.empty(n)
    rand_kernel[(triton.cdiv(n, 128),)](out, seed, n, BLOCK=128)
    expected = philox_uniform(seed, np.arange(n, dtype=np.int64))
    assert np.array_equal(out.numpy(), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_parity_with_regenerated_mask(dtype):
    check_case(2, 2, 1, 45, 77, 32, dtype, p=0.3, seed=987654321)
    check_case(1, 2, 2, 45, 77, 32, dtype, p=0.5, seed=5, wr=0, diag=32, softcap=3.0)
    # A window on both sides: random numbers are drawn only for the visible keys of each row.
    check_case(1, 2, 1, 150, 140, 24, dtype, p=0.25, seed=2**40 + 3, wl=37, wr=5, diag=-9)


def test_dropout_keep_fraction():
    b, h, lq, lk, p = 1, 4, 128, 256, 0.2
    keep = keep_mask(42, p, b, h, lq, lk).float().mean().item()
    assert abs(keep - (1 - p)) < 0.01
    # The kernel applies exactly this mask: with V = one-hot key index, out[i, j] is the kept,
    # rescaled probability of key j, so its zero pattern is the dropped keys.
    # All scores 0, so every probability is 1 / Lk.
    q, k = torch.zeros(b, h, lq, lk), torch.zeros(b, h, lk, lk)
    v = torch.eye(lk).expand(b, h, lk, lk).contiguous()
    out, _ = run_forward(q, k, v, p=p, seed=42, scale=1.0)
    kept = out != 0
    assert torch.equal(kept, keep_mask(42, p, b, h, lq, lk))
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / lk / (1 - p)))


def test_backward_bit_identical_across_runs():
    q, k, v = make_qkv(2, 4, 2, 150, 170, 64, torch.float32)
    dout = torch.randn_like(q)
    opts = {"wr": 0, "diag": 20, "p": 0.1, "seed": 7}
    out, lse = run_forward(q, k, v, **opts)
    first = run_backward(dout, q, k, v, out, lse, deterministic=True, **opts)
    for _ in range(2):
        again = run_backward(dout, q, k, v, out, lse, deterministic=True, **opts)
        for a, b in zip(first, again, strict=True):
            assert torch.equal(a, b)


class KernelAttention(torch.autograd.Function):
    """The two kernels as an autograd function, for gradcheck."""

    @staticmethod
    def forward(ctx, q, k, v, opts):
        out, lse = run_forward(q, k, v, **opts)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.opts = opts
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = run_backward(dout.contiguous(), q, k, v, out, lse, **ctx.opts)
        return dq, dk, dv, None


@pytest.mark.parametrize(
    "opts",
    [
        {},
        {"wr": 0, "diag": 3},
        {"wl": 2, "wr": 1, "diag": 1},
        {"softcap": 0.7, "alibi": torch.tensor([[0.3, 0.9]], dtype=torch.float32)},
        {"bias": torch.randn(1, 2, 6, 9, dtype=torch.float64)},
        {"p": 0.4, "seed": 3},
    ],
    ids=["plain", "causal", "window", "softcap-alibi", "bias", "dropout"],
)
def test_gradcheck_float64(opts):
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 2, 1, 6, 9, 5, torch.float64))
    assert torch.autograd.gradcheck(lambda a, b, c: KernelAttention.apply(a, b, c, opts), (q, k, v))


def _call(q=None, k=None, v=None, out=None, lse=None, bias=None, alibi=None, p=0.0):
    torch.ops.dlcore.attention_fwd_kernel(q, k, v, bias, alibi, 0.1, 0, -1, -1, 0.0, p, 0, out, lse)


def _good(d=16, hq=4, hk=2):
    q = torch.randn(2, hq, 5, d)
    k = torch.randn(2, hk, 7, d)
    return {
        "q": q,
        "k": k,
        "v": k.clone(),
        "out": torch.empty_like(q),
        "lse": torch.empty(2, hq, 5),
    }


@pytest.mark.parametrize(
    "change,match",
    [
        ({"q": torch.randn(2, 4, 5)}, r"q must be \(B, Hq, Lq, D\)"),
        ({"v": torch.randn(2, 2, 8, 16)}, "k shape .* must equal v shape"),
        ("heads", "q heads 4 must be a multiple of k/v heads 3"),
        ("d300", r"head dim 300 must be in \[1, 256\]"),
        ("strided", "unit stride in the last dim"),
        ("dtype", "dtypes differ"),
        ({"out": torch.empty(2, 4, 5, 8)}, r"out must have shape \[2, 4, 5, 16\]"),
        ({"lse": torch.empty(2, 4, 6)}, r"lse must be float32 of shape \[2, 4, 5\]"),
        ({"bias": torch.zeros(2, 4, 5, 3)}, "bias shape .* does not broadcast to"),
        ({"alibi": torch.zeros(4)}, r"alibi_slopes must be float32 \(B, Hq\)"),
        ({"p": 1.0}, r"dropout_p must be in \[0, 1\)"),
    ],
)
def test_bad_input_raises(change, match):
    args = _good()
    if change == "heads":
        args = _good(hk=3)
    elif change == "d300":
        args = _good(d=300)
    elif change == "strided":
        args["q"] = torch.randn(2, 4, 5, 32)[..., ::2]
    elif change == "dtype":
        args["k"] = args["k"].double()
    else:
        args.update(change)
    with pytest.raises(RuntimeError, match=match):
        _call(**args)


@pytest.mark.slow
@pytest.mark.parametrize("lq,lk", [(1023, 1024), (1024, 1023)])
@pytest.mark.parametrize("causal", [False, True])
def test_parity_long(lq, lk, causal):
    opts = {"wr": 0, "diag": lk - lq} if causal else {}
    check_case(1, 2, 1, lq, lk, 64, torch.float32, **opts)
    check_case(1, 2, 2, lq, lk, 128, torch.bfloat16, **opts)


def test_backward_partitions_agree():
    """One thread accumulates dQ in place (one key-block range per head); more threads than
    heads split the key blocks into separately summed dQ slices. Both match the reference."""
    # 4 (batch, kv head) pairs: one range each on one thread, several ranges on 2+ threads.
    q, k, v = make_qkv(2, 4, 2, 200, 300, 64, torch.float32)
    dout = torch.randn_like(q)
    out, lse = run_forward(q, k, v, wr=0, diag=100)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run_backward(dout, q, k, v, out, lse, wr=0, diag=100)
    finally:
        torch.set_num_threads(threads)
    split = run_backward(dout, q, k, v, out, lse, wr=0, diag=100)
    ref = reference(q, k, v, dout, torch.float64, wr=0, diag=100)
    ref32 = reference(q, k, v, dout, torch.float32, wr=0, diag=100)
    for name, a, b, r, r32 in zip("qkv", single, split, ref[2:], ref32[2:], strict=True):
        assert_parity(a, r, r32, name=f"d{name} one thread")
        assert_parity(b, r, r32, name=f"d{name} {threads} threads")
