"""dlcore.patch / dlcore.unpatch on the real libraries (transformers, diffusers, peft).

Per family: the patched model gives the unpatched model's outputs and gradients, unpatch puts
back the very objects that were there, patching twice changes nothing, state-dict keys do not
change, and the report says what was replaced and what was skipped and why.
"""

import copy
import importlib

import pytest
import torch
from torch import nn

import dlcore
import dlcore.nn
from dlcore.backends import forced_backend

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
diffusers = pytest.importorskip("diffusers")

RTOL, ATOL = 1e-4, 1e-5  # float32: different kernels round differently


def requires(module: str, name: str):
    """Skip unless ``dlcore.<module>.<name>`` exists (a family that has not landed)."""
    try:
        obj = getattr(importlib.import_module(f"dlcore.{module}"), name, None)
    except ImportError as exc:
        pytest.skip(f"dlcore.{module} does not import: {exc}")
    if obj is None:
        pytest.skip(f"dlcore.{module}.{name} is not available in this checkout")
    return obj


def requires_dlcore_attn_function() -> None:
    requires("nn", "MultiheadAttention")
    if "dlcore" not in transformers.AttentionInterface._global_mapping:
        pytest.skip("the 'dlcore' transformers attention function is not registered")


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(a: nn.Module, b: nn.Module) -> None:
    ga, gb = grads(a), grads(b)
    assert ga.keys() == gb.keys() and ga
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=RTOL, atol=ATOL, msg=name)


def module_ids(model: nn.Module) -> dict[str, int]:
    return {n: id(m) for n, m in model.named_modules()}


def tiny_llama(**overrides) -> nn.Module:
    torch.manual_seed(0)
    cfg = dict(
        vocab_size=67,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,  # GQA
        max_position_embeddings=64,
    )
    cfg.update(overrides)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))


def lora_llama() -> nn.Module:
    lora = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"],
        lora_dropout=0.0,
        init_lora_weights=False,  # B != 0: the adapters change the output
    )
    return peft.get_peft_model(tiny_llama(), lora)


# -- generic behaviour ------------------------------------------------------------------------


def test_bad_arguments():
    with pytest.raises(ValueError, match="families: unknown family 'rope'"):
        dlcore.patch(nn.Linear(2, 2), families=("attention", "rope"))
    with pytest.raises(ValueError, match="unknown dlcore backend 'fast'"):
        dlcore.patch(nn.Linear(2, 2), backend="fast")
    with pytest.raises(
        TypeError, match="model: expected a torch.nn.Module or a diffusers pipeline"
    ):
        dlcore.patch(object())


def test_unavailable_backend_raises():
    if dlcore.backends()["cuda"].available:
        pytest.skip("the cuda backend is available here")
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run here"):
        dlcore.patch(nn.Linear(2, 2), backend="cuda")


def test_nothing_to_patch():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    before = module_ids(model)
    report = dlcore.patch(model)
    assert report.replaced == [] and report.skipped == []
    assert "0 replaced, 0 skipped" in str(report)
    assert module_ids(model) == before
    assert dlcore.unpatch(model) == []


def test_unpatch_of_unpatched_model_is_a_noop():
    model = nn.MultiheadAttention(8, 2)
    assert dlcore.unpatch(model) == []


# -- attention: torch.nn.MultiheadAttention ----------------------------------------------------


class MHAModel(nn.Module):
    def __init__(self, batch_first: bool):
        super().__init__()
        self.inp = nn.Linear(12, 24)
        self.attn = nn.MultiheadAttention(24, 4, batch_first=batch_first)
        self.cross = nn.MultiheadAttention(24, 3, kdim=10, vdim=14, batch_first=batch_first)
        self.batch_first = batch_first

    def forward(self, x, mem_k, mem_v, key_padding_mask):
        h = self.inp(x)
        h = h + self.attn(h, h, h, need_weights=False, key_padding_mask=key_padding_mask)[0]
        return h + self.cross(h, mem_k, mem_v, need_weights=False)[0]


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention(batch_first):
    dl_mha = requires("nn", "MultiheadAttention")
    torch.manual_seed(0)
    ref = MHAModel(batch_first)
    model = copy.deepcopy(ref)
    keys = list(model.state_dict())
    originals = {"attn": model.attn, "cross": model.cross}

    report = dlcore.patch(model)
    assert {e.name for e in report.replaced} == {"attn", "cross"}
    assert all(e.family == "attention" for e in report.replaced)
    assert isinstance(model.attn, dl_mha) and isinstance(model.cross, dl_mha)
    assert list(model.state_dict()) == keys

    b, lq, lk = 3, 7, 5
    shape = (lambda b_, l_, d: (b_, l_, d)) if batch_first else (lambda b_, l_, d: (l_, b_, d))
    x = torch.randn(*shape(b, lq, 12))
    mem_k, mem_v = torch.randn(*shape(b, lk, 10)), torch.randn(*shape(b, lk, 14))
    pad = torch.zeros(b, lq, dtype=torch.bool)
    pad[1, -2:] = True  # padded keys in one sample
    out_ref = ref(x, mem_k, mem_v, pad)
    out = model(x, mem_k, mem_v, pad)
    torch.testing.assert_close(out, out_ref, rtol=RTOL, atol=ATOL)
    out.square().sum().backward()
    out_ref.square().sum().backward()
    assert_same_grads(model, ref)

    assert dlcore.patch(model).replaced == []  # twice: nothing more to do
    undone = dlcore.unpatch(model)
    assert {e.name for e in undone} == {"attn", "cross"}
    assert model.attn is originals["attn"] and model.cross is originals["cross"]
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(model(x, mem_k, mem_v, pad), out_ref, rtol=RTOL, atol=ATOL)


# -- attention: transformers' attention-function registry ------------------------------------


def test_transformers_attention_function():
    requires_dlcore_attn_function()
    ref = tiny_llama()
    model = copy.deepcopy(ref)
    assert model.config._attn_implementation == "sdpa"
    report = dlcore.patch(model, families="attention")
    assert [e.name for e in report.replaced] == [""]
    assert report.replaced[0].replacement == "'sdpa' -> 'dlcore'"
    assert model.config._attn_implementation == "dlcore"
    assert model.model.config._attn_implementation == "dlcore"

    ids = torch.randint(0, 67, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, :3] = 0  # left padding: the padding mask must reach the attention function
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    out_ref = ref(input_ids=ids, attention_mask=mask, labels=ids)
    keep = mask.bool()
    torch.testing.assert_close(out.logits[keep], out_ref.logits[keep], rtol=RTOL, atol=ATOL)
    out.loss.backward()
    out_ref.loss.backward()
    assert_same_grads(model, ref)

    assert dlcore.patch(model).replaced == []
    dlcore.unpatch(model)
    assert model.config._attn_implementation == "sdpa"


def test_transformers_model_without_attention_interface_is_skipped():
    requires_dlcore_attn_function()
    # CLIP text/vision towers and the like are fine; a model that cannot switch is reported.
    model = transformers.MambaForCausalLM(
        transformers.MambaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, state_size=4)
    )
    report = dlcore.patch(model, families="attention")
    assert report.replaced == []
    (entry,) = report.skipped
    assert "AttentionInterface" in entry.reason


# -- attention: diffusers processors -----------------------------------------------------------


def tiny_unet() -> nn.Module:
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24,
        attention_head_dim=4,
        norm_num_groups=8,
    )


def tiny_unet2d() -> nn.Module:
    """Unconditional UNet: self-attention with group norm and a residual inside ``Attention``."""
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )


def _processors(model):
    # UNet2DModel has no `attn_processors` property; every diffusers Attention has `.processor`.
    from diffusers.models.attention_processor import Attention

    return {n: m.processor for n, m in model.named_modules() if isinstance(m, Attention)}


@pytest.mark.parametrize("unet", ["UNet2DConditionModel", "UNet2DModel"])
def test_diffusers_attention_processors(unet):
    processor = requires("nn", "AttnProcessor")
    conditional = unet == "UNet2DConditionModel"
    ref = tiny_unet() if conditional else tiny_unet2d()
    model = copy.deepcopy(ref)
    originals = _processors(model)
    report = dlcore.patch(model)
    names = {e.name for e in report.replaced}
    assert len(names) == len(originals) and report.skipped == []
    if conditional:  # self and cross attention
        assert any(n.endswith("attn1") for n in names) and any(n.endswith("attn2") for n in names)
    assert all(isinstance(p, processor) for p in _processors(model).values())

    if conditional:
        sample, text = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 24)
        out = model(sample, 10, encoder_hidden_states=text).sample
        out_ref = ref(sample, 10, encoder_hidden_states=text).sample
    else:
        sample = torch.randn(2, 3, 8, 8)
        out, out_ref = model(sample, 10).sample, ref(sample, 10).sample
    torch.testing.assert_close(out, out_ref, rtol=RTOL, atol=ATOL)
    out.sum().backward()
    out_ref.sum().backward()
    assert_same_grads(model, ref)

    assert dlcore.patch(model).replaced == []
    dlcore.unpatch(model)
    restored = _processors(model)
    assert restored.keys() == originals.keys()
    assert all(restored[n] is p for n, p in originals.items())


# -- scan: transformers MambaMixer -------------------------------------------------------------


def tiny_mamba() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.MambaConfig(
        vocab_size=53, hidden_size=24, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4
    )
    return transformers.MambaForCausalLM(cfg).eval()


def test_mamba_mixer():
    mixer_cls = requires("nn", "MambaMixer")
    ref = tiny_mamba()
    model = copy.deepcopy(ref)
    keys = list(model.state_dict())
    originals = [layer.mixer for layer in model.backbone.layers]
    report = dlcore.patch(model)
    assert report.counts() == {"scan": 2}
    assert all(isinstance(layer.mixer, mixer_cls) for layer in model.backbone.layers)
    assert list(model.state_dict()) == keys

    ids = torch.randint(0, 53, (2, 13))
    out = model(input_ids=ids, labels=ids)
    out_ref = ref(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.logits, out_ref.logits, rtol=RTOL, atol=ATOL)
    out.loss.backward()
    out_ref.loss.backward()
    assert_same_grads(model, ref)

    with torch.no_grad():  # cached decode goes through the patched mixers too
        kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(ids[:1], **kw), ref.generate(ids[:1], **kw))

    assert dlcore.patch(model).replaced == []
    dlcore.unpatch(model)
    assert [layer.mixer for layer in model.backbone.layers] == originals


# -- lora: peft LoRA Linear --------------------------------------------------------------------


def test_peft_lora():
    requires("nn", "LoRALinear")
    ref = lora_llama()
    model = copy.deepcopy(ref)
    keys = list(model.state_dict())
    peft_layers = {
        n: m for n, m in model.named_modules() if type(m) is peft.tuners.lora.layer.Linear
    }
    report = dlcore.patch(model, families="lora")
    assert report.counts() == {"lora": len(peft_layers)} and len(peft_layers) == 10
    assert {e.name for e in report.replaced} == set(peft_layers)
    assert list(model.state_dict()) == keys

    ids = torch.randint(0, 67, (3, 9))
    out = model(input_ids=ids, labels=ids)
    out_ref = ref(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.logits, out_ref.logits, rtol=RTOL, atol=ATOL)
    out.loss.backward()
    out_ref.loss.backward()
    assert_same_grads(model, ref)  # only the LoRA parameters require grad

    dlcore.unpatch(model)
    now = {n: m for n, m in model.named_modules() if type(m) is peft.tuners.lora.layer.Linear}
    assert now.keys() == peft_layers.keys()
    assert all(now[n] is peft_layers[n] for n in now)


def test_peft_lora_unsupported_variant_is_skipped():
    requires("nn", "LoRALinear")
    lora = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], use_dora=True)
    model = peft.get_peft_model(tiny_llama(num_hidden_layers=1), lora)
    report = dlcore.patch(model, families="lora")
    assert report.replaced == []
    assert len(report.skipped) == 2
    assert all("unsupported" in e.reason and "DoRA" in e.reason for e in report.skipped)


def test_full_lora_llama_patch_and_training_state_carries_over():
    """All families at once on a LoRA Llama; training while patched is kept after unpatch."""
    requires("nn", "LoRALinear")
    model = lora_llama()
    report = dlcore.patch(model)
    assert report.counts().get("lora") == 10
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = torch.randint(0, 67, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    logits = model(input_ids=ids).logits
    dlcore.unpatch(model)
    after = model.state_dict()
    assert after.keys() == trained.keys()
    assert all(torch.equal(after[k], trained[k]) for k in trained)
    torch.testing.assert_close(model(input_ids=ids).logits, logits, rtol=RTOL, atol=ATOL)


# -- sampler: diffusers pipeline schedulers ----------------------------------------------------


@pytest.mark.parametrize("scheduler_name", ["DDIMScheduler", "DDPMScheduler"])
def test_pipeline_scheduler(scheduler_name):
    dl_cls = requires("schedulers", scheduler_name)
    unet = tiny_unet2d()
    scheduler = getattr(diffusers, scheduler_name)(num_train_timesteps=100)
    pipe_cls = (
        diffusers.DDIMPipeline if scheduler_name == "DDIMScheduler" else diffusers.DDPMPipeline
    )
    ref = pipe_cls(unet=unet, scheduler=scheduler)
    pipe = pipe_cls(unet=copy.deepcopy(unet), scheduler=copy.deepcopy(scheduler))
    original = pipe.scheduler
    report = dlcore.patch(pipe, families="sampler")
    assert isinstance(pipe.scheduler, dl_cls)
    assert [e.name for e in report.replaced] == ["scheduler"]
    assert pipe.config.scheduler[0] != "diffusers"  # the pipeline's config follows the swap

    def run(p):
        return p(
            batch_size=2,
            num_inference_steps=5,
            generator=torch.Generator().manual_seed(3),
            output_type="np",
        ).images

    torch.testing.assert_close(
        torch.from_numpy(run(pipe)), torch.from_numpy(run(ref)), rtol=1e-4, atol=1e-5
    )
    assert dlcore.patch(pipe, families="sampler").replaced == []
    dlcore.unpatch(pipe)
    assert pipe.scheduler is original
    assert pipe.config.scheduler == ("diffusers", scheduler_name)


# -- backend pinning ---------------------------------------------------------------------------


def test_backend_pin_runs_patched_modules_under_that_backend():
    requires("nn", "LoRALinear")
    model = lora_llama()
    layer_path = "base_model.model.model.layers.0.self_attn.q_proj"
    ids = torch.randint(0, 67, (1, 5))

    def backend_seen_by_patched_layer(pin: str) -> str | None:
        dlcore.patch(model, families="lora", backend=pin)
        seen = []
        # Registered after the pin's hooks, so it sees what the patched forward sees.
        handle = model.get_submodule(layer_path).register_forward_pre_hook(
            lambda m, a: seen.append(forced_backend())
        )
        model(input_ids=ids)
        handle.remove()
        return seen[0]

    assert backend_seen_by_patched_layer("eager") == "eager"
    assert forced_backend() is None  # the pin ends with the forward
    assert backend_seen_by_patched_layer("cpu") == "cpu"  # patching again re-pins
    patched = model.get_submodule(layer_path)
    assert len(patched._forward_pre_hooks) == 1  # one pin, not one per patch call
    dlcore.unpatch(model)
    assert type(model.get_submodule(layer_path)) is peft.tuners.lora.layer.Linear
    assert not patched._forward_pre_hooks and not patched._forward_hooks  # pin removed


def test_backend_that_cannot_run_the_device_is_a_skip():
    requires("nn", "LoRALinear")
    with torch.device("meta"):
        model = lora_llama()
    report = dlcore.patch(model, families="lora", backend="cpu")
    assert report.replaced == [] and len(report.skipped) == 10
    assert all(
        e.reason.startswith("device: backend 'cpu' cannot run meta tensors") for e in report.skipped
    )


def test_unsupported_dtype_is_a_skip():
    requires("nn", "LoRALinear")
    model = lora_llama()
    layer = model.base_model.model.model.layers[1].mlp.gate_proj
    int8 = torch.zeros_like(layer.base_layer.weight, dtype=torch.int8)
    layer.base_layer.weight = nn.Parameter(int8, requires_grad=False)  # a quantised base layer
    report = dlcore.patch(model, families="lora")
    assert report.counts() == {"lora": 9}
    (entry,) = report.skipped
    assert entry.name == "base_model.model.model.layers.1.mlp.gate_proj"
    assert entry.reason.startswith("dtype: parameters are int8")
    assert "skipped (dtype: parameters are int8" in str(report)


def test_backend_pin_on_a_pipeline_scheduler(monkeypatch):
    requires("schedulers", "DDIMScheduler")
    from dlcore.ops import sampler

    seen = []

    def spy():  # what the sampler op sees when it picks its backend
        seen.append(forced_backend())
        return seen[-1]

    monkeypatch.setattr(sampler, "forced_backend", spy)
    pipe = diffusers.DDIMPipeline(unet=tiny_unet2d(), scheduler=diffusers.DDIMScheduler())
    report = dlcore.patch(pipe, families="sampler", backend="eager")
    assert report.backend == "eager" and "backend pinned to 'eager'" in str(report)
    pipe.scheduler.set_timesteps(4)
    x, eps = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8)
    t = pipe.scheduler.timesteps[0]
    dl_scheduler = pipe.scheduler
    pinned = dl_scheduler.step(eps, t, x).prev_sample
    assert seen and set(seen) == {"eager"}
    dlcore.unpatch(pipe)
    assert "step" not in vars(dl_scheduler)  # the pin is gone from the dlcore scheduler
    assert isinstance(pipe.scheduler, diffusers.DDIMScheduler)
    pipe.scheduler.set_timesteps(4)
    expected = pipe.scheduler.step(eps, t, x).prev_sample
    torch.testing.assert_close(pinned, expected, rtol=1e-5, atol=1e-6)
