"""dlcore.schedulers against diffusers: constructor/config compatibility, full sampling loops,
and diffusers pipelines with the dlcore scheduler swapped in."""

import inspect

import pytest
import torch
from conftest import backends_for

import dlcore
from dlcore.schedulers import DDIMScheduler, DDPMScheduler

diffusers = pytest.importorskip("diffusers")

FUSED = backends_for("cpu", ("triton", "cpu"))


def _model(x, t):
    """A smooth stand-in for a denoiser (so loop errors measure rounding, not chaos)."""
    ramp = torch.arange(x[0].numel(), dtype=x.dtype).reshape(x.shape[1:])
    return 0.7 * x + 0.1 * torch.cos(ramp + float(t))


def _error(a, ref):
    return (a.double() - ref.double()).abs().max().item()


def _assert_float32_rounding(got, ours64, diffusers32, what):
    """A fused fp32 loop is as close to the float64 loop as diffusers' own fp32 loop (x2, plus a
    floor of a few float32 ulps of the result)."""
    limit = 2 * _error(diffusers32, ours64) + 8 * 1.2e-7 * ours64.abs().max().item()
    err = _error(got, ours64)
    assert err <= limit, f"{what}: error {err:.3g} vs float64 loop, limit {limit:.3g}"


# ---------------------------------------------------------------- construction and config


@pytest.mark.parametrize("ours,theirs", [(DDIMScheduler, "DDIMScheduler"),
                                         (DDPMScheduler, "DDPMScheduler")])  # fmt: skip
def test_constructor_matches_diffusers(ours, theirs):
    theirs = getattr(diffusers, theirs)
    mine = inspect.signature(ours.__init__).parameters
    ref = {k: v for k, v in inspect.signature(theirs.__init__).parameters.items() if k != "kwargs"}
    assert list(mine) == list(ref)
    for name, p in ref.items():
        assert mine[name].default == p.default, name
    assert ours.order == theirs.order


@pytest.mark.parametrize(
    "config",
    [
        dict(),
        dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1),
        dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing"),
        dict(rescale_betas_zero_snr=True, timestep_spacing="linspace", num_train_timesteps=500),
        dict(trained_betas=[0.01 * (i + 1) for i in range(50)], num_train_timesteps=50),
    ],
)
@pytest.mark.parametrize("cls", ["DDIMScheduler", "DDPMScheduler"])
def test_schedule_tables_and_timesteps(cls, config):
    theirs = getattr(diffusers, cls)(**config)
    for ours in (
        getattr(dlcore.schedulers, cls).from_config(theirs.config),
        getattr(dlcore.schedulers, cls).from_config(theirs),
        getattr(dlcore.schedulers, cls).from_config(dict(theirs.config)),
    ):
        theirs = getattr(diffusers, cls)(**config)
        assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod)
        assert torch.equal(ours.betas, theirs.betas)
        assert torch.equal(ours.timesteps, theirs.timesteps)
        for steps in (1, 7, 10, 50):
            theirs.set_timesteps(steps)
            ours.set_timesteps(steps)
            assert torch.equal(ours.timesteps, theirs.timesteps), steps
        assert ours.init_noise_sigma == theirs.init_noise_sigma
        assert len(ours) == len(theirs)
        for key, value in theirs.config.items():
            if not key.startswith("_"):
                assert ours.config[key] == value and getattr(ours.config, key) == value


def test_sigmoid_and_laplace_schedules_for_ddpm():
    for schedule in ("sigmoid", "laplace"):
        theirs = diffusers.DDPMScheduler(beta_schedule=schedule)
        assert torch.equal(DDPMScheduler(beta_schedule=schedule).betas, theirs.betas)
    with pytest.raises(NotImplementedError, match="sigmoid"):
        DDIMScheduler(beta_schedule="sigmoid")


def test_from_config_ignores_foreign_keys_and_takes_overrides():
    ddpm = diffusers.DDPMScheduler(variance_type="learned_range", beta_schedule="scaled_linear")
    ours = DDIMScheduler.from_config(ddpm.config, clip_sample=False)
    assert ours.config.beta_schedule == "scaled_linear"
    assert ours.config.clip_sample is False
    assert "variance_type" not in ours.config
    _, unused = DDIMScheduler.from_config(ddpm.config, return_unused_kwargs=True)
    assert "variance_type" in unused


def test_set_timesteps_errors():
    s = DDIMScheduler()
    with pytest.raises(ValueError, match="cannot be larger than num_train_timesteps"):
        s.set_timesteps(2000)
    with pytest.raises(ValueError, match="call set_timesteps"):
        s.step(torch.zeros(1, 1), 10, torch.zeros(1, 1))
    with pytest.raises(ValueError, match="descending"):
        DDPMScheduler().set_timesteps(timesteps=[1, 5])


def test_add_noise_get_velocity_scale_model_input():
    theirs = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    ours = DDPMScheduler.from_config(theirs.config)
    gen = torch.Generator().manual_seed(0)
    x, n = torch.randn(3, 2, 4, 4, generator=gen), torch.randn(3, 2, 4, 4, generator=gen)
    t = torch.tensor([0, 500, 999])
    assert torch.equal(ours.add_noise(x, n, t), theirs.add_noise(x, n, t))
    assert torch.equal(ours.get_velocity(x, n, t), theirs.get_velocity(x, n, t))
    assert ours.scale_model_input(x, 10) is x


def test_step_return_types():
    s = DDIMScheduler()
    s.set_timesteps(10)
    x = torch.randn(1, 2, 3, 3)
    out = s.step(x, s.timesteps[0], x)
    assert torch.equal(out[0], out.prev_sample) and torch.equal(out[1], out.pred_original_sample)
    assert torch.equal(out["prev_sample"], out.prev_sample)
    tup = s.step(x, s.timesteps[0], x, return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == 2 and torch.equal(tup[0], out.prev_sample)


# ---------------------------------------------------------------- full loops

DDIM_CONFIGS = [
    dict(),
    dict(clip_sample=False, prediction_type="v_prediction", timestep_spacing="trailing",
         rescale_betas_zero_snr=True),
    dict(thresholding=True, beta_schedule="squaredcos_cap_v2", prediction_type="sample"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
         set_alpha_to_one=False, clip_sample=False),
]  # fmt: skip


def _ddim_loop(scheduler, x, eta, noises, backend, use_clipped=False):
    for t, n in zip(scheduler.timesteps, noises, strict=True):
        with dlcore.backend(backend):
            x = scheduler.step(_model(x, t), t, x, eta=eta, variance_noise=n.to(x.dtype),
                               use_clipped_model_output=use_clipped).prev_sample  # fmt: skip
    return x


@pytest.mark.parametrize("config", DDIM_CONFIGS)
@pytest.mark.parametrize("eta", [0.0, 0.8])
def test_ddim_10_step_loop_matches_diffusers(config, eta):
    theirs = diffusers.DDIMScheduler(**config)
    ours = DDIMScheduler.from_config(theirs.config)
    theirs.set_timesteps(10)
    ours.set_timesteps(10)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, 8, generator=gen)
    noises = [torch.randn(x.shape, generator=gen) for _ in range(10)]
    use_clipped = bool(config.get("thresholding"))
    ref32 = x
    for t, n in zip(theirs.timesteps, noises, strict=True):
        ref32 = theirs.step(_model(ref32, t), t, ref32, eta=eta, variance_noise=n,
                            use_clipped_model_output=use_clipped).prev_sample  # fmt: skip
    eager = _ddim_loop(ours, x, eta, noises, "eager", use_clipped)
    assert torch.equal(eager, ref32), "eager loop is not bit for bit diffusers'"
    ours64 = _ddim_loop(ours, x.double(), eta, noises, "eager", use_clipped)
    for backend in ("cpu", "triton"):
        got = _ddim_loop(ours, x, eta, noises, backend, use_clipped)
        _assert_float32_rounding(got, ours64, ref32, f"DDIM {config} eta={eta} {backend}")


def test_ddim_generator_loop_is_bit_exact():
    theirs = diffusers.DDIMScheduler()
    ours = DDIMScheduler.from_config(theirs.config)
    for s in (theirs, ours):
        s.set_timesteps(10)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    results = []
    for s, backend in ((theirs, None), (ours, "eager")):
        y, gen = x, torch.Generator().manual_seed(5)
        for t in s.timesteps:
            with dlcore.backend(backend):
                y = s.step(_model(y, t), t, y, eta=1.0, generator=gen).prev_sample
        results.append(y)
    assert torch.equal(results[0], results[1])


VARIANCE_TYPES = ["fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range"]


def _learned_model(x, t, variance_type):
    eps = _model(x, t)
    if variance_type == "learned":
        return torch.cat([eps, 1e-3 + 1e-3 * torch.sigmoid(x)], 1)
    if variance_type == "learned_range":
        return torch.cat([eps, torch.tanh(x)], 1)
    return eps


def _ddpm_loop(scheduler, x, variance_type, backend, generator=None, noises=None):
    for i, t in enumerate(scheduler.timesteps):
        kw = {"generator": generator} if noises is None else {"variance_noise": noises[i]}
        with dlcore.backend(backend):
            x = scheduler.step(_learned_model(x, t, variance_type), t, x, **kw).prev_sample
    return x


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("variance_type", VARIANCE_TYPES)
@pytest.mark.parametrize("steps", [1000, 25], ids=["1000-steps", "25-steps"])
def test_ddpm_loop_matches_diffusers(variance_type, steps, backend, request):
    if backend == "triton" and steps == 1000 and not request.config.getoption("--runslow"):
        pytest.skip("1000 Triton-interpreter steps: run with --runslow (25 steps run by default)")
    config = dict(variance_type=variance_type, clip_sample=variance_type != "fixed_large")
    theirs = diffusers.DDPMScheduler(**config)
    ours = DDPMScheduler.from_config(theirs.config)
    if steps != 1000:
        theirs.set_timesteps(steps)
        ours.set_timesteps(steps)
    x = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    ref32 = _ddpm_loop(theirs, x, variance_type, None, torch.Generator().manual_seed(3))
    eager = _ddpm_loop(ours, x, variance_type, "eager", torch.Generator().manual_seed(3))
    assert torch.equal(eager, ref32), "eager loop is not bit for bit diffusers'"
    # The same noise diffusers drew (one randn per step with t > 0), for the float64 loop.
    gen = torch.Generator().manual_seed(3)
    noises = [
        torch.randn(x.shape, generator=gen).double() if int(t) > 0 else None for t in ours.timesteps
    ]
    ours64 = _ddpm_loop(ours, x.double(), variance_type, "eager", noises=noises)
    got = _ddpm_loop(ours, x, variance_type, backend, torch.Generator().manual_seed(3))
    _assert_float32_rounding(got, ours64, ref32, f"DDPM {variance_type} {backend}")


@pytest.mark.parametrize("backend", FUSED)
def test_per_sample_timesteps(backend):
    """One step of a batch whose samples sit at different timesteps equals per-sample steps."""
    ours = DDIMScheduler(clip_sample=False)
    ours.set_timesteps(20)
    theirs = diffusers.DDIMScheduler(clip_sample=False)
    theirs.set_timesteps(20)
    gen = torch.Generator().manual_seed(4)
    x, m = torch.randn(3, 2, 5, 5, generator=gen), torch.randn(3, 2, 5, 5, generator=gen)
    t = ours.timesteps[[0, 7, 19]]
    with dlcore.backend(backend):
        got = ours.step(m, t, x).prev_sample
    for i in range(3):
        expected = theirs.step(m[i : i + 1], t[i], x[i : i + 1]).prev_sample
        torch.testing.assert_close(got[i : i + 1], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", FUSED)
def test_guidance_in_step_matches_pipeline_cfg(backend):
    """step(model_output=cat([uncond, cond]), guidance_scale=, guidance_rescale=) equals the
    StableDiffusionPipeline sequence: chunk, CFG, rescale_noise_cfg, scheduler.step."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    theirs = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                     beta_end=0.012, clip_sample=False, steps_offset=1)  # fmt: skip
    ours = DDIMScheduler.from_config(theirs.config)
    theirs.set_timesteps(30)
    ours.set_timesteps(30)
    gen = torch.Generator().manual_seed(6)
    latents = torch.randn(2, 4, 8, 8, generator=gen)
    noise_pred = torch.randn(4, 4, 8, 8, generator=gen)
    t = theirs.timesteps[4]
    uncond, text = noise_pred.chunk(2)
    guided = rescale_noise_cfg(uncond + 7.5 * (text - uncond), text, guidance_rescale=0.7)
    expected = theirs.step(guided, t, latents, return_dict=False)[0]
    with dlcore.backend(backend):
        got = ours.step(noise_pred, t, latents, guidance_scale=7.5, guidance_rescale=0.7,
                        return_dict=False)[0]  # fmt: skip
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-5)


@pytest.mark.gpu
def test_step_does_not_sync_on_cuda():
    ours = DDPMScheduler(variance_type="fixed_small_log")
    ours.set_timesteps(50, device="cuda")
    x = torch.randn(2, 4, 64, 64, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    ours.step(x, ours.timesteps[0], x, generator=gen)  # warm-up: tables to the device
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t in ours.timesteps[:5]:
            x = ours.step(x, t, x, generator=gen).prev_sample
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ---------------------------------------------------------------- pipelines


def _tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    ).eval()  # fmt: skip


@pytest.mark.parametrize(
    "pipeline,cls,steps,kwargs",
    [
        ("DDIMPipeline", DDIMScheduler, 10, dict(eta=0.5)),
        ("DDPMPipeline", DDPMScheduler, 20, {}),
    ],
)
def test_pipeline_with_dlcore_scheduler(pipeline, cls, steps, kwargs):
    unet = _tiny_unet()
    sched = getattr(diffusers, pipeline.replace("Pipeline", "Scheduler"))()
    pipe = getattr(diffusers, pipeline)(unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)

    def run():
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            return pipe(batch_size=2, generator=gen, num_inference_steps=steps,
                        output_type="np", **kwargs).images  # fmt: skip

    expected = run()
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    assert isinstance(pipe.scheduler, cls)
    with dlcore.backend("eager"):
        assert (run() == expected).all(), "eager backend: not the same images"
    fused = run()  # default backend: the fused CPU kernel
    assert abs(fused - expected).max() < 1e-4


@pytest.mark.parametrize("backend", [*FUSED, "eager"])
def test_ddpm_per_sample_timesteps_use_device_lookups(backend):
    """A (batch,) timestep tensor takes the no-sync path (gathers, noise masked at t == 0); it
    must agree with stepping each sample with its own host timestep."""
    ours = DDPMScheduler(variance_type="fixed_small_log")
    ours.set_timesteps(25)
    gen = torch.Generator().manual_seed(7)
    x, m, n = (torch.randn(3, 2, 4, 4, generator=gen) for _ in range(3))
    t = ours.timesteps[[0, 12, 24]]  # the last one is t == 0: no noise
    assert int(t[-1]) == 0
    with dlcore.backend(backend):
        got = ours.step(m, t, x, variance_noise=n).prev_sample
        for i in range(3):
            expected = ours.step(m[i : i + 1], t[i], x[i : i + 1], variance_noise=n[i : i + 1])
            torch.testing.assert_close(got[i : i + 1], expected.prev_sample, rtol=1e-5,
                                       atol=1e-6)  # fmt: skip
