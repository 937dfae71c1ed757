"""Fused sampler step: parity of every backend with the float64 reference, noise, guidance,
out=, layouts, bad input, opcheck, torch.compile, autograd routing."""

import itertools

import pytest
import torch
from conftest import backends_for

import dlcore
from dlcore.ops import sampler as ops
from dlcore.reference import sampler as ref
from dlcore.testing import assert_parity, cast_floats, poison_

BACKENDS = backends_for("cpu", ("triton", "cpu", "eager"))
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
PREDICTIONS = ["epsilon", "sample", "v_prediction"]
CLIPS = ["none", "clip", "threshold"]
SHAPE = (2, 3, 5, 7)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _alphas(kind, batch, gen, ddpm=False):
    if kind == "float":
        return 0.3, 0.55
    if kind == "0d":
        return torch.tensor(0.42), torch.tensor(0.61)
    a_t = torch.rand(batch, generator=gen) * 0.8 + 0.1
    return a_t, (a_t + 0.03 + 0.1 * torch.rand(batch, generator=gen)).clamp(max=0.999)


def _clip_kwargs(clip):
    if clip == "clip":
        return dict(clip_sample=True, clip_sample_range=0.8)
    if clip == "threshold":
        return dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.7)
    return {}


def _model_output(shape, variance_type, gen):
    m = torch.randn(shape, generator=gen)
    if variance_type == "learned":
        return torch.cat([m, torch.rand(shape, generator=gen) * 0.9 + 0.05], 1)
    if variance_type == "learned_range":
        return torch.cat([m, torch.rand(shape, generator=gen) * 2 - 1], 1)
    return m


def _to(tree, device):
    if isinstance(tree, torch.Tensor):
        return tree.to(device)
    if isinstance(tree, (list, tuple)):
        return type(tree)(_to(t, device) for t in tree)
    if isinstance(tree, dict):
        return {k: _to(v, device) for k, v in tree.items()}
    return tree


def _check(fn, reffn, args, kwargs, dtype, backend, outputs=("prev_sample", "pred_original"),
           device="cpu"):  # fmt: skip
    args, kwargs = _to(args, device), _to(kwargs, device)
    args_lp = cast_floats(args, dtype)
    kwargs_lp = cast_floats(kwargs, dtype)
    ref64 = reffn(*cast_floats(args, torch.float64), **cast_floats(kwargs, torch.float64))
    ref_lp = reffn(*args_lp, **kwargs_lp)
    out = (poison_(torch.empty_like(args_lp[0])), poison_(torch.empty_like(args_lp[0])))
    with dlcore.backend(backend):
        got = fn(*args_lp, **kwargs_lp, out=out)
    assert got[0] is out[0] and got[1] is out[1]
    for g, r64, rlp, name in zip(got, ref64, ref_lp, outputs, strict=True):
        assert g.dtype == dtype
        assert_parity(g, r64, rlp, name=f"{name} [{backend}, {dtype}]")


# ---------------------------------------------------------------- parity matrix

DDIM_MATRIX = list(itertools.product(PREDICTIONS, CLIPS, [0.0, 0.7]))


def _ddim_case(prediction, clip, eta, alphas="per_sample", guided=False, use_clipped=False):
    gen = _gen(1)
    x = torch.randn(SHAPE, generator=gen)
    m = _model_output(SHAPE, "fixed_small", gen)
    a_t, a_prev = _alphas(alphas, SHAPE[0], gen)
    kw = dict(eta=eta, prediction_type=prediction, noise=torch.randn(SHAPE, generator=gen))
    kw.update(_clip_kwargs(clip))
    kw["use_clipped_model_output"] = use_clipped
    if guided:
        kw.update(
            model_output_uncond=torch.randn(SHAPE, generator=gen),
            guidance_scale=4.5,
            guidance_rescale=0.6,
        )
    return (x, m, a_t, a_prev), kw


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("prediction,clip,eta", DDIM_MATRIX)
def test_ddim_parity_matrix(backend, dtype, prediction, clip, eta, request):
    idx = DDIM_MATRIX.index((prediction, clip, eta))
    if (
        backend == "triton"
        and idx % 3 != DTYPES.index(dtype)
        and not request.config.getoption("--runslow")
    ):
        pytest.skip("interpreter: covered by another dtype of this row (all with --runslow)")
    args, kw = _ddim_case(prediction, clip, eta, use_clipped=idx % 2 == 1)
    _check(dlcore.ddim_step, ref.ddim_step, args, kw, dtype, backend)


DDPM_MATRIX = list(itertools.product(ref.VARIANCE_TYPES, PREDICTIONS))


def _ddpm_case(variance_type, prediction, clip, alphas="per_sample", guided=False, concat=False):
    gen = _gen(2)
    x = torch.randn(SHAPE, generator=gen)
    m = _model_output(SHAPE, variance_type, gen)
    a_t, a_prev = _alphas(alphas, SHAPE[0], gen, ddpm=True)
    kw = dict(
        variance_type=variance_type,
        prediction_type=prediction,
        noise=torch.randn(SHAPE, generator=gen),
    )
    kw.update(_clip_kwargs(clip))
    if guided:
        u = _model_output(SHAPE, variance_type, gen)
        if concat:
            m = torch.cat([u, m])
        else:
            kw["model_output_uncond"] = u
        kw.update(guidance_scale=3.0, guidance_rescale=0.5)
    return (x, m, a_t, a_prev), kw


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variance_type,prediction", DDPM_MATRIX)
def test_ddpm_parity_matrix(backend, dtype, variance_type, prediction, request):
    idx = DDPM_MATRIX.index((variance_type, prediction))
    if (
        backend == "triton"
        and idx % 3 != DTYPES.index(dtype)
        and not request.config.getoption("--runslow")
    ):
        pytest.skip("interpreter: covered by another dtype of this row (all with --runslow)")
    clip = CLIPS[idx % 3]
    args, kw = _ddpm_case(variance_type, prediction, clip, alphas=["per_sample", "float"][idx % 2])
    _check(dlcore.ddpm_step, ref.ddpm_step, args, kw, dtype, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("clip", CLIPS)
def test_ddim_inversion_parity(backend, dtype, clip):
    gen = _gen(3)
    x, m = torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)
    kw = dict(prediction_type="v_prediction" if clip == "clip" else "epsilon")
    kw.update(_clip_kwargs(clip))
    a_t, a_next = torch.tensor(0.6), torch.tensor(0.35)
    _check(dlcore.ddim_inversion_step, ref.ddim_inversion_step, (x, m, a_t, a_next), kw, dtype,
           backend, outputs=("next_sample", "pred_original"))  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("concat", [False, True], ids=["two-tensors", "batch-concat"])
@pytest.mark.parametrize("method", ["ddim", "ddpm-learned_range"])
def test_guidance_parity(backend, dtype, concat, method):
    if method == "ddim":
        args, kw = _ddim_case("epsilon", "threshold", 0.4, guided=True)
        if concat:
            u = kw.pop("model_output_uncond")
            args = (args[0], torch.cat([u, args[1]]), *args[2:])
        _check(dlcore.ddim_step, ref.ddim_step, args, kw, dtype, backend)
    else:
        args, kw = _ddpm_case("learned_range", "epsilon", "clip", guided=True, concat=concat)
        _check(dlcore.ddpm_step, ref.ddpm_step, args, kw, dtype, backend)


def test_guidance_matches_diffusers_cfg_and_rescale():
    """The reference's guidance is diffusers' pipeline code: uncond + s*(c-u), then
    rescale_noise_cfg."""
    pytest.importorskip("diffusers")
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    gen = _gen(4)
    c, u = torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)
    expected = rescale_noise_cfg(u + 7.5 * (c - u), c, guidance_rescale=0.7)
    assert torch.equal(ref.guide(c, u, 7.5, 0.7), expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "shape",
    [(1, 1), (3, 1), (1, 4, 1, 1), (2, 4, 33, 31), (2, 1, 5000)],
    ids=["batch1-len1", "len1", "1x1", "odd-2-blocks", "stats-chunks"],
)
def test_shapes(backend, shape):
    """Batch 1, length 1, odd sizes past the block and the statistics chunk (4096)."""
    gen = _gen(5)
    x, m, u = (torch.randn(shape, generator=gen) for _ in range(3))
    n = torch.randn(shape, generator=gen)
    kw = dict(eta=1.0, noise=n, model_output_uncond=u, guidance_scale=2.0)
    if len(shape) > 1 and shape[-1] > 1:
        kw["guidance_rescale"] = 0.5
    if len(shape) >= 2 and shape[0] * shape[1] > 1 or len(shape) > 2:
        kw.update(_clip_kwargs("threshold"))
    _check(dlcore.ddim_step, ref.ddim_step, (x, m, 0.2, 0.5), kw, torch.float32, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs_and_outputs(backend):
    gen = _gen(6)
    base = torch.randn(2, 3, 6, 10, generator=gen)
    x = base[..., ::2]  # strided last dim
    m = torch.randn(2, 6, 3, 5, generator=gen).transpose(1, 2)  # per-sample non-contiguous
    u = torch.randn(2, 3, 5, 6, generator=gen).transpose(2, 3)
    n = torch.randn(4, 3, 6, 5, generator=gen)[::2]  # batch stride only (no copy needed)
    a_t, a_prev = torch.tensor([0.3, 0.7]), torch.tensor([0.5, 0.9])
    kw = dict(eta=0.8, noise=n, model_output_uncond=u, guidance_scale=3.0, clip_sample=True)
    r64 = ref.ddim_step(*cast_floats((x, m, a_t, a_prev), torch.float64),
                        **cast_floats(kw, torch.float64))  # fmt: skip
    r32 = ref.ddim_step(x, m, a_t, a_prev, **kw)
    out_store = poison_(torch.empty(2, 3, 6, 10))
    out = (out_store[..., ::2], poison_(torch.empty(2, 6, 3, 5)).transpose(1, 2))
    with dlcore.backend(backend):
        got = dlcore.ddim_step(x, m, a_t, a_prev, **kw, out=out)
    for g, r, rl in zip(got, r64, r32, strict=True):
        assert_parity(g, r, rl)
    assert torch.isnan(out_store[..., 1::2]).all(), "wrote outside the out view"


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_aliases_sample_in_place(backend):
    gen = _gen(7)
    x = torch.randn(SHAPE, generator=gen)
    m = torch.randn(SHAPE, generator=gen)
    expected = ref.ddpm_step(x, m, 0.4, 0.6, noise=None, add_noise=False, thresholding=True)
    x0 = poison_(torch.empty_like(x))
    with dlcore.backend(backend):
        prev, got_x0 = dlcore.ddpm_step(x, m, 0.4, 0.6, add_noise=False, thresholding=True,
                                        out=(x, x0))  # fmt: skip
    assert prev is x
    torch.testing.assert_close(x, expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_x0, expected[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("guided,clip,noise", list(itertools.product([False, True], repeat=3)))
def test_cpu_fused_f32_pass_large_threaded_and_aliased(guided, clip, noise):
    """The cpu kernel's single-loop float32 path (every guidance x clip x noise variant) over
    several parallel chunks per sample, an odd tail, and outputs aliasing sample and
    model_output element for element."""
    gen = _gen(11)
    shape = (3, 4, 97, 89)  # 34532 elements per sample: three 16384-element chunks
    x = torch.randn(shape, generator=gen)
    m = torch.randn(shape, generator=gen)
    kw = dict(eta=0.6 if noise else 0.0, noise=torch.randn(shape, generator=gen))
    if guided:
        kw.update(model_output_uncond=torch.randn(shape, generator=gen), guidance_scale=6.0)
    if clip:
        kw.update(clip_sample=True, clip_sample_range=0.9)
    a_t, a_prev = torch.tensor([0.2, 0.5, 0.9]), torch.tensor([0.4, 0.6, 0.95])
    r64 = ref.ddim_step(*cast_floats((x, m, a_t, a_prev), torch.float64),
                        **cast_floats(kw, torch.float64))  # fmt: skip
    r32 = ref.ddim_step(x, m, a_t, a_prev, **kw)
    with dlcore.backend("cpu"):
        prev, x0 = dlcore.ddim_step(x, m, a_t, a_prev, **kw, out=(x, m))
    assert prev is x and x0 is m
    assert_parity(prev, r64[0], r32[0], name="prev_sample")
    assert_parity(x0, r64[1], r32[1], name="pred_original_sample")


def _large_allocations(fn, min_bytes):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:  # fmt: skip
        fn()
    return [e for e in prof.events() if e.cpu_memory_usage >= min_bytes]


@pytest.mark.parametrize("thresholding", [False, True])
def test_out_allocates_nothing_full_size_cpu(thresholding):
    shape = (2, 4, 64, 64)
    x, m, u = (torch.randn(shape) for _ in range(3))
    out = (torch.empty(shape), torch.empty(shape))
    full = x.numel() * 4

    def step():
        with dlcore.backend("cpu"):
            dlcore.ddim_step(x, m, 0.3, 0.5, eta=1.0, noise="fused", seed=3,
                             model_output_uncond=u, guidance_scale=5.0, guidance_rescale=0.7,
                             thresholding=thresholding, out=out)  # fmt: skip

    step()
    assert _large_allocations(step, full // 2) == []


# ---------------------------------------------------------------- noise


def test_philox_reference_is_tritons_randn():
    """dlcore.reference.sampler.philox_randn reproduces tl.randn(seed, offset) (interpreter)."""
    triton = pytest.importorskip("triton")
    import triton.language as tl

    @triton.jit
    def randn_kernel(out_ptr, seed, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + offs, tl.randn(seed, offs), mask=offs < n)

    for seed in (0, 12345, 2**40 + 7):
        n = 3000
        got = torch.empty(n)
        randn_kernel[(triton.cdiv(n, 1024),)](got, seed, n, BLOCK=1024)
        torch.testing.assert_close(ref.philox_randn(seed, (n,)), got, rtol=0, atol=1e-6)


def _fused_noise(backend, seed, shape=(2, 3, 50, 7)):
    """The fused noise itself: with sample = model_output = 0, DDPM's prev is sigma * noise."""
    x = torch.zeros(shape)
    a_t, a_prev = 0.5, 0.8
    with dlcore.backend(backend):
        prev, _ = dlcore.ddpm_step(x, x, a_t, a_prev, variance_type="fixed_large", noise="fused",
                                   seed=seed)  # fmt: skip
    return prev / (1 - a_t / a_prev) ** 0.5


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_noise_stream_is_philox_and_reproducible(backend):
    a = _fused_noise(backend, 7)
    assert torch.equal(a, _fused_noise(backend, 7))
    assert not torch.allclose(a, _fused_noise(backend, 8))
    # Every backend draws the same stream: Triton's tl.randn(seed, row-major index).
    torch.testing.assert_close(a, ref.philox_randn(7, a.shape), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("backend", backends_for("cpu", ("cpu", "eager")))
def test_fused_noise_distribution(backend):
    z = _fused_noise(backend, 2024, shape=(4, 1, 256, 256)).double().flatten()
    n = z.numel()
    assert abs(z.mean().item()) < 4 / n**0.5
    assert abs(z.var().item() - 1) < 6 * (2 / n) ** 0.5
    # tails of a standard normal (Box-Muller from 31-bit uniforms)
    assert abs((z.abs() > 2).double().mean().item() - 0.0455) < 0.003
    # neighbouring elements are uncorrelated
    assert abs(torch.corrcoef(torch.stack([z[:-1], z[1:]]))[0, 1].item()) < 0.01


def test_generator_noise_is_diffusers_randn_tensor():
    pytest.importorskip("diffusers")
    from diffusers.utils.torch_utils import randn_tensor

    for gen in (
        torch.Generator().manual_seed(3),
        [torch.Generator().manual_seed(i) for i in (1, 2)],
    ):
        expected = randn_tensor(SHAPE, generator=gen, device=torch.device("cpu"))
        gen2 = (
            torch.Generator().manual_seed(3)
            if isinstance(gen, torch.Generator)
            else [torch.Generator().manual_seed(i) for i in (1, 2)]
        )
        got = ops.randn_like_diffusers(SHAPE, gen2, torch.device("cpu"), torch.float32)
        assert torch.equal(got, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ddpm_add_noise_mask(backend):
    gen = _gen(8)
    x, m, n = (torch.randn(SHAPE, generator=gen) for _ in range(3))
    mask = torch.tensor([True, False])
    with dlcore.backend(backend):
        got, _ = dlcore.ddpm_step(x, m, 0.3, 0.5, noise=n, add_noise=mask)
        off, _ = dlcore.ddpm_step(x, m, 0.3, 0.5, noise=n, add_noise=False)
        on, _ = dlcore.ddpm_step(x, m, 0.3, 0.5, noise=n, add_noise=True)
    torch.testing.assert_close(got[0], on[0])
    torch.testing.assert_close(got[1], off[1])
    assert not torch.allclose(on[1], off[1])


def test_eager_is_bit_exact_with_diffusers_formulas():
    """With a 0-d float32 alpha (what diffusers indexes out of alphas_cumprod) the eager path is
    diffusers' arithmetic op for op."""
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(clip_sample=True, prediction_type="v_prediction")
    sched.set_timesteps(20)
    gen = _gen(9)
    x, m, n = (torch.randn(SHAPE, generator=gen) for _ in range(3))
    t = sched.timesteps[5]
    expected = sched.step(m, t, x, eta=0.3, variance_noise=n, return_dict=False)
    a_t = sched.alphas_cumprod[t]
    a_prev = sched.alphas_cumprod[t - 50]
    with dlcore.backend("eager"):
        got = dlcore.ddim_step(x, m, a_t, a_prev, eta=0.3, noise=n, clip_sample=True,
                               prediction_type="v_prediction")  # fmt: skip
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_fixed_large_log_is_defined_where_diffusers_gives_nan():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDPMScheduler(variance_type="fixed_large_log")
    sched.set_timesteps(10)
    x = torch.randn(SHAPE, generator=_gen(10))
    t = sched.timesteps[3]
    assert torch.isnan(sched.step(x, t, x, generator=_gen(1)).prev_sample).all()
    a_t, a_prev = sched.alphas_cumprod[t], sched.alphas_cumprod[t - 100]
    n = torch.randn(SHAPE, generator=_gen(1))
    large, _ = dlcore.ddpm_step(x, x, a_t, a_prev, variance_type="fixed_large", noise=n)
    large_log, _ = dlcore.ddpm_step(x, x, a_t, a_prev, variance_type="fixed_large_log", noise=n)
    torch.testing.assert_close(large_log, large)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(prediction_type="eps"), "prediction_type must be one of"),
        (dict(model_output=torch.randn(2, 3, 5, 6)),
         r"model_output must have shape \(2, 3, 5, 7\)"),
        (dict(model_output=torch.randn(2, 3, 5, 7).half()),
         "model_output must have the sample's dtype"),
        (dict(alpha_prod_t=1.5), r"alpha_prod_t must lie in \(0, 1\]"),
        (dict(alpha_prod_t=0.0), r"alpha_prod_t must lie in \(0, 1\]"),
        (dict(alpha_prod_t_prev=torch.tensor([0.5, -0.1])), r"alpha_prod_t_prev must lie in"),
        (dict(alpha_prod_t=torch.rand(3)),
         r"alpha_prod_t must be .* shape \(2,\), got shape \(3,\)"),
        (dict(eta=1.0, noise=torch.randn(SHAPE), generator=torch.Generator()),
         "either noise or generator"),
        (dict(eta=1.0, noise="fused"), "needs an integer seed"),
        (dict(eta=1.0, noise="fast", seed=1), "noise must be a tensor, None or 'fused'"),
        (dict(eta=1.0, noise=torch.randn(2, 3, 5)), r"noise must have shape \(2, 3, 5, 7\)"),
        (dict(seed=3), "seed is only used with noise='fused'"),
        (dict(guidance_scale=3.0), r"model_output must have shape \(4, 3, 5, 7\) .*concatenated"),
        (dict(model_output_uncond=torch.randn(SHAPE)), "model_output_uncond needs guidance_scale"),
        (dict(guidance_scale=2.0, model_output_uncond=torch.randn(2, 3, 5, 1)),
         "model_output_uncond must have shape"),
        (dict(out=(torch.empty(SHAPE),)), r"out must be a \(prev_sample, pred_original_sample\)"),
        (dict(out=(torch.empty(2, 3, 5, 8), torch.empty(SHAPE))), r"out\[0\] must have shape"),
        (dict(thresholding=True, dynamic_thresholding_ratio=1.5), "dynamic_thresholding_ratio"),
    ],
)  # fmt: skip
def test_ddim_bad_input(kwargs, match):
    args = dict(sample=torch.randn(SHAPE), model_output=torch.randn(SHAPE), alpha_prod_t=0.3,
                alpha_prod_t_prev=0.5)  # fmt: skip
    for k in list(args):
        if k in kwargs:
            args[k] = kwargs.pop(k)
    with pytest.raises((ValueError, TypeError), match=match):
        dlcore.ddim_step(args.pop("sample"), args.pop("model_output"), args.pop("alpha_prod_t"),
                         args.pop("alpha_prod_t_prev"), **kwargs)  # fmt: skip


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(variance_type="learned_small"), "variance_type must be one of"),
        (dict(variance_type="learned"), r"must have 2 \* channels = 6 channels"),
        (dict(variance_type="learned_range", model_output=torch.randn(2, 5, 5, 7)), "6 channels"),
    ],
)
def test_ddpm_bad_input(kwargs, match):
    mo = kwargs.pop("model_output", torch.randn(SHAPE))
    with pytest.raises(ValueError, match=match):
        dlcore.ddpm_step(torch.randn(SHAPE), mo, 0.3, 0.5, **kwargs)


def test_out_partial_overlap_is_refused():
    x = torch.randn(4, 3, 5, 7)
    m = torch.randn(2, 3, 5, 7)
    with pytest.raises(ValueError, match=r"out\[0\] overlaps sample"):
        with dlcore.backend("cpu"):
            dlcore.ddim_step(x[:2], m, 0.3, 0.5, out=(x[1:3], torch.empty(2, 3, 5, 7)))


def test_forced_backend_that_cannot_run_names_why():
    if "cuda" in ops.implemented():
        pytest.skip("cuda backend is built here")
    with pytest.raises(RuntimeError, match="does not implement"):
        with dlcore.backend("cuda"):
            dlcore.ddim_step(torch.randn(SHAPE), torch.randn(SHAPE), 0.3, 0.5)


# ---------------------------------------------------------------- op registration


def _op_args(thresholding=False, guided=True):
    gen = _gen(11)
    x, m, u, n = (torch.randn(SHAPE, generator=gen) for _ in range(4))
    a_t = torch.tensor([0.3, 0.6])
    a_prev = torch.tensor([0.5, 0.8])
    return (
        x, m, u if guided else None, n, a_t, a_prev, None, 0, 0, 0, 2 if thresholding else 1,
        1.0, 0.9, 1.5, 0.5, False, 3.0, 0.5 if guided else 0.0, 0, 1,
        torch.empty(SHAPE), torch.empty(SHAPE),
    )  # fmt: skip


@pytest.mark.parametrize("backend", backends_for("cpu", ("cpu", "triton", "eager")))
@pytest.mark.parametrize("thresholding", [False, True])
def test_opcheck_sampler_step(backend, thresholding):
    with dlcore.backend(backend):
        torch.library.opcheck(ops.sampler_step_op, _op_args(thresholding))


@pytest.mark.skipif("cpu" not in ops.implemented(), reason="dlcore._C not built")
def test_opcheck_kernel_ops():
    gen = _gen(12)
    x, m, u = (torch.randn(2, 35, generator=gen) for _ in range(3))
    a = torch.tensor([0.3, 0.6])
    ap = torch.tensor([0.5, 0.8])
    torch.library.opcheck(
        torch.ops.dlcore.sampler_step_kernel.default,
        (x, m, u, None, None, a, ap, None, None, None, 0, 0, 0, 1, 1.0, 0.0, False, 2.0, 0, 0,
         False, torch.empty(2, 35), torch.empty(2, 35)),
    )  # fmt: skip
    torch.library.opcheck(
        torch.ops.dlcore.sampler_cfg_stats_kernel.default, (x, u, 2.0, torch.empty(2, 1, 4))
    )
    torch.library.opcheck(
        torch.ops.dlcore.sampler_quantile_kernel.default,
        (x.abs(), 0.9, 1.0, 2.0, torch.empty(2)),
    )


def test_cpu_kernel_takes_samples_as_they_are():
    """The C++ kernels take (batch, ...) tensors with contiguous samples and any batch stride
    as they are (no rows view), with the results of the (batch, n) rows; other layouts are
    refused naming the tensor."""
    gen = _gen(14)
    x, u = (torch.randn(3, 4, 7, 5, generator=gen) for _ in range(2))
    m = torch.randn(6, 4, 7, 5, generator=gen)[::2]  # batch stride only
    a, ap = torch.tensor([0.3, 0.6, 0.45]), torch.tensor([0.5, 0.8, 0.7])
    step = torch.ops.dlcore.sampler_step_kernel

    def run(xs, ms, us, outs):
        step(xs, ms, us, None, None, a, ap, None, None, None, 0, 2, 0, 1, 0.8, 0.0, False, 2.5,
             0, 0, False, *outs)  # fmt: skip

    nd = tuple(poison_(torch.empty(3, 4, 7, 5)) for _ in range(2))
    rows = tuple(poison_(torch.empty(3, 140)) for _ in range(2))
    run(x, m, u, nd)
    run(x.reshape(3, -1), m.reshape(3, -1), u.reshape(3, -1), rows)
    for got, want in zip(nd, rows, strict=True):
        assert torch.equal(got.reshape(3, -1), want)
    with pytest.raises(RuntimeError, match="model_output must have contiguous samples"):
        run(x, m.transpose(2, 3), u, nd)
    with pytest.raises(RuntimeError, match=r"uncond must hold 3 samples of 140 elements"):
        run(x, m, u[:, :3], nd)


def test_torch_compile_fullgraph():
    gen = _gen(13)
    x, m, u = (torch.randn(SHAPE, generator=gen) for _ in range(3))
    a_t = torch.tensor([0.3, 0.6])
    a_prev = torch.tensor([0.5, 0.8])

    def step(x, m, u, a_t, a_prev):
        prev, x0 = dlcore.ddim_step(
            x,
            m,
            a_t,
            a_prev,
            eta=0.5,
            noise="fused",
            seed=5,
            model_output_uncond=u,
            guidance_scale=4.0,
            clip_sample=True,
        )
        return prev * 2, x0  # fmt: skip

    compiled = torch.compile(step, fullgraph=True)
    got = compiled(x, m, u, a_t, a_prev)
    expected = step(x, m, u, a_t, a_prev)
    torch.testing.assert_close(got, expected)


def test_meta_tensors():
    x = torch.empty(SHAPE, device="meta")
    out = (torch.empty_like(x), torch.empty_like(x))
    meta = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in _op_args()]
    ops.sampler_step_op(*meta[:-2], *out)
    assert out[0].device.type == "meta"


# ---------------------------------------------------------------- autograd


def test_requires_grad_routes_to_the_differentiable_reference():
    gen = _gen(14)
    x = torch.randn(SHAPE, generator=gen, requires_grad=True)
    m = torch.randn(SHAPE, generator=gen, requires_grad=True)
    prev, x0 = dlcore.ddim_step(x, m, 0.3, 0.5, clip_sample=True)
    assert prev.requires_grad and x0.requires_grad
    (prev.sum() + x0.sum()).backward()
    assert x.grad is not None and m.grad is not None
    with pytest.raises(ValueError, match="out= is not supported when inputs require grad"):
        dlcore.ddim_step(x, m, 0.3, 0.5, out=(torch.empty(SHAPE), torch.empty(SHAPE)))


@pytest.mark.parametrize("method", ["ddim", "ddpm", "inversion"])
def test_gradcheck_float64(method):
    gen = _gen(15)
    shape = (2, 2, 3, 2)
    x = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    m = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    u = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    n = torch.randn(shape, generator=gen, dtype=torch.float64)
    a_t = torch.tensor([0.3, 0.6], dtype=torch.float64, requires_grad=True)

    def fn(x, m, u, a_t):
        kw = dict(model_output_uncond=u, guidance_scale=3.0, guidance_rescale=0.5)
        if method == "ddim":
            return dlcore.ddim_step(x, m, a_t, 0.9, eta=0.5, noise=n, **kw)
        if method == "ddpm":
            return dlcore.ddpm_step(x, m, a_t, 0.9, noise=n, variance_type="fixed_small_log", **kw)
        return dlcore.ddim_inversion_step(x, m, 0.9, a_t, **kw)

    assert torch.autograd.gradcheck(fn, (x, m, u, a_t))


@pytest.mark.parametrize("backend", BACKENDS)
def test_check_parity_cases(backend):
    """The cases `python -m dlcore check` runs for this family pass here."""
    for case in ops.parity_cases():
        for dtype in case.dtypes:
            args, kwargs = case.make(dtype, torch.device("cpu"), _gen(0))
            with dlcore.backend(backend):
                got = case.run(*args, **kwargs)
            r64 = case.reference(*cast_floats(args, torch.float64),
                                 **cast_floats(kwargs, torch.float64))  # fmt: skip
            rlp = case.reference(*args, **kwargs)
            for g, a, b, name in zip(got, r64, rlp, case.outputs, strict=True):
                assert_parity(g, a, b, name=f"{case.op} {case.label} {name} {dtype}")


# ---------------------------------------------------------------- GPU (run where one is lent)

GPU_BACKENDS = backends_for("cuda", ("cuda", "triton"))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_parity(backend, dtype):
    args, kw = _ddim_case("epsilon", "threshold", 0.6, guided=True)
    _check(dlcore.ddim_step, ref.ddim_step, args, kw, dtype, backend, device="cuda")
    args, kw = _ddim_case("v_prediction", "clip", 0.0, use_clipped=True)
    _check(dlcore.ddim_step, ref.ddim_step, args, kw, dtype, backend, device="cuda")
    for variance_type in ref.VARIANCE_TYPES:
        args, kw = _ddpm_case(variance_type, "sample", "clip", guided=True, concat=True)
        _check(dlcore.ddpm_step, ref.ddpm_step, args, kw, dtype, backend, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_fused_noise_is_philox(backend):
    x = torch.zeros(3, 4, 33, 65, device="cuda")
    with dlcore.backend(backend):
        prev, _ = dlcore.ddpm_step(x, x, 0.5, 0.8, variance_type="fixed_large", noise="fused",
                                   seed=99)  # fmt: skip
    z = prev / (1 - 0.5 / 0.8) ** 0.5
    torch.testing.assert_close(z.cpu(), ref.philox_randn(99, tuple(x.shape)), rtol=1e-4,
                               atol=1e-4)  # fmt: skip
