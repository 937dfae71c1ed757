"""Whole models, patched by ``dlcore.patch`` ("dlcore") vs the same model unpatched ("eager").

Both candidates hold the same random-init weights and run the same user code; the only
difference is ``dlcore.patch``. Each case's notes record what the patch replaced and the peak
memory of one call of each candidate (RSS growth on CPU, allocator peak on CUDA).

- GPT-2 small (12 layers, 768 wide, 12 heads), forward: attention through transformers'
  registry (``attn_implementation="dlcore"`` vs the default "sdpa").
- GPT-2 small with peft LoRA (r 16 on c_attn, c_proj, c_fc; base frozen), forward + backward.
- Mamba-130M (24 layers, 768 wide, N 16): prefill 1024 tokens + 64 greedy decode steps.
- DDIM, 50 steps with classifier-free guidance over a small UNet2DConditionModel.

``--quick`` runs the same cases at reduced sizes (fewer layers, shorter sequences, smaller
latents) so the family takes a minute or two on a 2-core CPU.
"""

from __future__ import annotations

import copy
import ctypes
import gc
from collections.abc import Callable
from typing import Any

import torch

import dlcore

from . import harness
from .harness import Case, sync

GOAL = "dlcore >= 1.0x the unpatched model"


def _peak_memory(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Bytes one call of ``fn`` adds at its peak over what was resident before it."""
    gc.collect()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    try:
        # Hand freed heap pages back to the OS, else the previous call's memory is reused without
        # showing in RSS; then writing 5 to clear_refs resets the peak RSS (VmHWM) to the current
        # RSS (Linux >= 4.0).
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = harness.rss_bytes("VmRSS")
        fn()
        return harness.rss_bytes("VmHWM") - before
    except OSError:
        return None  # not Linux/glibc: no per-call peak available


def _finish(
    case: Case, device: torch.device, patched: Any, fns: dict[str, Callable[[], Any]], report
) -> dict[str, Callable[[], Any]]:
    case.notes["patched"] = report.counts()
    case.notes["skipped"] = [str(e) for e in report.skipped]
    case.notes["peak_mem_mb"] = {}
    for fn in fns.values():
        fn()  # warm-up: lazy initialisation and allocator growth are not the model's peak
    for name, fn in fns.items():
        peak = _peak_memory(fn, device)
        case.notes["peak_mem_mb"][name] = None if peak is None else round(peak / 2**20, 1)
    return fns


# -- GPT-2 ------------------------------------------------------------------------------------


def _gpt2(device: torch.device, layers: int, vocab: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=layers, n_embd=768, n_head=12, vocab_size=vocab, n_positions=1024)
    return GPT2LMHeadModel(cfg).to(device).eval()


def gpt2_forward(layers: int, vocab: int, batch: int, seq: int, case: Case):
    def setup(device: torch.device) -> dict[str, Callable[[], Any]]:
        model = _gpt2(device, layers, vocab)
        patched = copy.deepcopy(model)
        report = dlcore.patch(patched)
        ids = torch.randint(0, vocab, (batch, seq), device=device)

        def run(m):
            @torch.inference_mode()
            def fn():
                return m(input_ids=ids).logits

            return fn

        return _finish(case, device, patched, {"dlcore": run(patched), "eager": run(model)}, report)

    return setup


def gpt2_lora_train(layers: int, vocab: int, batch: int, seq: int, case: Case):
    def setup(device: torch.device) -> dict[str, Callable[[], Any]]:
        import peft

        base = _gpt2(device, layers, vocab).train()
        lora = peft.LoraConfig(
            r=16,
            lora_alpha=32,
            target_modules=["c_attn", "c_proj", "c_fc"],
            fan_in_fan_out=True,  # GPT-2 stores its projections as Conv1D (in, out)
            lora_dropout=0.0,
        )
        model = peft.get_peft_model(base, lora)
        patched = copy.deepcopy(model)
        report = dlcore.patch(patched)
        ids = torch.randint(0, vocab, (batch, seq), device=device)

        def run(m):
            def fn():
                loss = m(input_ids=ids, labels=ids).loss
                loss.backward()
                m.zero_grad(set_to_none=True)
                return loss

            return fn

        return _finish(case, device, patched, {"dlcore": run(patched), "eager": run(model)}, report)

    return setup


# -- Mamba ------------------------------------------------------------------------------------


def mamba_generate(layers: int, vocab: int, prefill: int, decode: int, case: Case):
    def setup(device: torch.device) -> dict[str, Callable[[], Any]]:
        from transformers import MambaConfig, MambaForCausalLM

        torch.manual_seed(0)
        cfg = MambaConfig(
            vocab_size=vocab,
            hidden_size=768,
            state_size=16,
            num_hidden_layers=layers,
            expand=2,
            conv_kernel=4,
        )
        model = MambaForCausalLM(cfg).to(device).eval()
        patched = copy.deepcopy(model)
        report = dlcore.patch(patched)
        ids = torch.randint(0, vocab, (1, prefill), device=device)

        def run(m):
            @torch.inference_mode()
            def fn():
                return m.generate(
                    ids,
                    max_new_tokens=decode,
                    min_new_tokens=decode,
                    do_sample=False,
                    pad_token_id=0,
                )

            return fn

        return _finish(case, device, patched, {"dlcore": run(patched), "eager": run(model)}, report)

    return setup


# -- diffusers DDIM with classifier-free guidance ------------------------------------------


def _ddim_pipeline(device: torch.device, channels: tuple[int, ...], latent: int):
    from diffusers import DDIMScheduler, DiffusionPipeline, UNet2DConditionModel

    class CFGLoop(DiffusionPipeline):
        """The text-to-image sampling loop of Stable Diffusion, on given text embeddings."""

        def __init__(self, unet, scheduler):
            super().__init__()
            self.register_modules(unet=unet, scheduler=scheduler)

        @torch.inference_mode()
        def __call__(self, latents, cond, uncond, steps: int, guidance_scale: float):
            self.scheduler.set_timesteps(steps, device=latents.device)
            embeddings = torch.cat([uncond, cond])
            for t in self.scheduler.timesteps:
                model_in = self.scheduler.scale_model_input(torch.cat([latents] * 2), t)
                eps = self.unet(model_in, t, encoder_hidden_states=embeddings).sample
                eps_uncond, eps_cond = eps.chunk(2)
                eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
                latents = self.scheduler.step(eps, t, latents, eta=0.0).prev_sample
            return latents

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=latent,
        in_channels=4,
        out_channels=4,
        block_out_channels=channels,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * (len(channels) - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(channels) - 1),
        cross_attention_dim=128,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False
    )
    return CFGLoop(unet.to(device).eval(), scheduler)


def ddim_cfg(channels: tuple[int, ...], latent: int, steps: int, batch: int, case: Case):
    def setup(device: torch.device) -> dict[str, Callable[[], Any]]:
        pipe = _ddim_pipeline(device, channels, latent)
        patched = copy.deepcopy(pipe)
        report = dlcore.patch(patched)
        g = torch.Generator().manual_seed(0)
        latents = torch.randn(batch, 4, latent, latent, generator=g).to(device)
        cond = torch.randn(batch, 77, 128, generator=g).to(device)
        uncond = torch.randn(batch, 77, 128, generator=g).to(device)

        def run(p):
            return lambda: p(latents, cond, uncond, steps, 7.5)

        return _finish(case, device, patched, {"dlcore": run(patched), "eager": run(pipe)}, report)

    return setup


def _case(name: str, quick: bool, build, **sizes) -> Case:
    case = Case(family="models", name=name, setup=None, quick=quick, goal=GOAL)
    case.notes["sizes"] = sizes
    case.setup = build(case=case, **sizes)
    return case


GPT2_QUICK = dict(layers=2, vocab=8192, batch=1, seq=128)
GPT2_FULL = dict(layers=12, vocab=50257, batch=1, seq=1024)
LORA_FULL = dict(GPT2_FULL, seq=512)
MAMBA_QUICK = dict(layers=4, vocab=8192, prefill=256, decode=16)
MAMBA_FULL = dict(layers=24, vocab=50280, prefill=1024, decode=64)
DDIM_QUICK = dict(channels=(32, 64), latent=16, steps=20, batch=1)
DDIM_FULL = dict(channels=(64, 128, 128), latent=32, steps=50, batch=1)

CASES = [
    _case("gpt2-small 2 layers fwd 1x128 fp32 (quick)", True, gpt2_forward, **GPT2_QUICK),
    _case("gpt2-small fwd 1x1024 fp32", False, gpt2_forward, **GPT2_FULL),
    _case(
        "gpt2-small 2 layers LoRA r16 fwd+bwd 1x128 (quick)", True, gpt2_lora_train, **GPT2_QUICK
    ),
    _case("gpt2-small LoRA r16 fwd+bwd 1x512 fp32", False, gpt2_lora_train, **LORA_FULL),
    _case(
        "mamba-130m 4 layers prefill 256 + 16 decode (quick)", True, mamba_generate, **MAMBA_QUICK
    ),
    _case("mamba-130m prefill 1024 + 64 decode fp32", False, mamba_generate, **MAMBA_FULL),
    _case("DDIM 20 steps CFG, UNet (32,64) 16x16 (quick)", True, ddim_cfg, **DDIM_QUICK),
    _case("DDIM 50 steps CFG, UNet (64,128,128) 32x32 fp32", False, ddim_cfg, **DDIM_FULL),
]

test_models = harness.pytest_benchmark_test(CASES)
