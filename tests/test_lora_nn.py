"""dlcore.nn.LoRALinear: construction from nn.Linear and from peft, adapters, merge/unmerge,
disabling, mixed batches, torch.compile, and a peft LoRA Llama patched with dlcore (same logits,
same LoRA gradients, same state-dict keys)."""

import math

import pytest
import torch
from conftest import backends_for
from torch import nn

import dlcore
from dlcore.nn import LoRALinear
from dlcore.nn.lora import convert_peft_lora, restore_peft_lora
from dlcore.reference import lora as ref
from dlcore.testing import assert_parity

BACKENDS = backends_for("cpu", ("triton", "cpu", "eager"))


def _randomise_b(module: nn.Module, seed: int = 0) -> None:
    """peft and from_linear start with B = 0; give B values so the adapters matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_from_linear_matches_peft_formula(backend):
    torch.manual_seed(0)
    lin = nn.Linear(45, 70)
    m = LoRALinear.from_linear(lin, r=8, alpha=16, use_rslora=True)
    assert m.base_layer is lin and m.scaling["default"] == pytest.approx(16 / math.sqrt(8))
    x = torch.randn(2, 3, 45)
    with dlcore.backend(backend):
        torch.testing.assert_close(m(x), lin(x))  # B = 0 at init, as in peft
        _randomise_b(m)
        out = m(x)
    a, b = m.lora_A["default"].weight, m.lora_B["default"].weight
    want = ref.lora_linear_reference(
        x.double(), lin.weight.double(), lin.bias.double(), a.double(), b.double(), 16 / 8**0.5
    )
    assert_parity(out, want, name="LoRALinear out")
    keys = set(m.state_dict())
    assert keys == {"base_layer.weight", "base_layer.bias", "lora_A.default.weight",
                    "lora_B.default.weight"}  # fmt: skip


def test_fan_in_fan_out_conv1d():
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    torch.manual_seed(1)
    conv = pytorch_utils.Conv1D(70, 45)  # weight (in, out), GPT-2 style
    m = LoRALinear(conv, fan_in_fan_out=True)
    m.add_adapter("a", r=4, alpha=8)
    _randomise_b(m)
    x = torch.randn(5, 45)
    a, b = m.lora_A["a"].weight, m.lora_B["a"].weight
    torch.testing.assert_close(m(x), conv(x) + 2.0 * (x @ a.t() @ b.t()), rtol=1e-5, atol=1e-5)


def test_merge_unmerge_fp32():
    torch.manual_seed(2)
    lin = nn.Linear(64, 48)
    original = lin.weight.detach().clone()
    m = LoRALinear.from_linear(lin, r=16, alpha=32)
    _randomise_b(m)
    m.eval()
    x = torch.randn(7, 64)
    unmerged = m(x)
    m.merge()
    assert m.merged and m.merged_adapters == ["default"]
    merged = m(x)
    merged_weight = lin.weight.detach().clone()
    a, b = m.lora_A["default"].weight.double(), m.lora_B["default"].weight.double()
    want = x.double() @ (original.double() + 2.0 * b @ a).t() + lin.bias.double()
    assert_parity(merged, want, unmerged, name="merged vs unmerged")
    m.unmerge()
    assert not m.merged
    # float64 arithmetic rounded once each way: unmerge lands within half an ulp (of the merged
    # value's binade) of the original weight.
    ulp = torch.finfo(torch.float32).eps * torch.maximum(original.abs(), merged_weight.abs())
    assert bool(((lin.weight - original).abs() <= ulp / 2).all())
    torch.testing.assert_close(m(x), unmerged, rtol=1e-6, atol=1e-6)


def test_adapters_set_disable_and_several_active():
    torch.manual_seed(3)
    lin = nn.Linear(30, 20)
    m = LoRALinear(lin)
    m.add_adapter("a", r=4, alpha=4)
    m.add_adapter("b", r=2, alpha=8, dropout=0.1)
    _randomise_b(m)
    assert m.active_adapters == ["b"]
    assert not m.lora_A["a"].weight.requires_grad and m.lora_A["b"].weight.requires_grad
    m.eval()
    x = torch.randn(6, 30)

    def lora(name):
        a, b = m.lora_A[name].weight, m.lora_B[name].weight
        return m.scaling[name] * (x @ a.t() @ b.t())

    torch.testing.assert_close(m(x), lin(x) + lora("b"), rtol=1e-5, atol=1e-5)
    m.set_adapter("a")
    torch.testing.assert_close(m(x), lin(x) + lora("a"), rtol=1e-5, atol=1e-5)
    m.set_adapter(["a", "b"])
    torch.testing.assert_close(m(x), lin(x) + lora("a") + lora("b"), rtol=1e-5, atol=1e-5)
    with m.disable_adapters():
        assert m.adapters_disabled
        torch.testing.assert_close(m(x), lin(x))
    assert not m.adapters_disabled
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['c'\]"):
        m.set_adapter("c")
    m.train()
    with pytest.raises(NotImplementedError, match="different dropout rates"):
        m(x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_batch_matches_peft(backend):
    peft = pytest.importorskip("peft")
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(24, 40))
    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["0"], lora_dropout=0.0)
    pm = peft.get_peft_model(model, cfg)
    pm.add_adapter("other", peft.LoraConfig(r=3, lora_alpha=5, target_modules=["0"]))
    _randomise_b(pm)
    layer = pm.base_model.model[0]
    layer.eval()
    x = torch.randn(5, 7, 24)
    names = ["other", "__base__", "default", "other", "missing"]
    want = layer(x, adapter_names=names)
    m = LoRALinear.from_peft(layer)
    with dlcore.backend(backend):
        got = m(x, adapter_names=names)
        single = m(x)
    assert_parity(got, want.double(), name="mixed batch vs peft", floor=1e-5)
    assert_parity(single, layer(x).double(), name="active adapter vs peft", floor=1e-5)
    with pytest.raises(ValueError, match="Length of `adapter_names`"):
        m(x, adapter_names=names[:3])


def test_compile_fullgraph():
    torch.manual_seed(5)
    m = LoRALinear.from_linear(nn.Linear(40, 24), r=4, alpha=8)
    _randomise_b(m)
    x = torch.randn(3, 5, 40, requires_grad=True)
    want = m(x)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    got = compiled(x)
    torch.testing.assert_close(got, want)
    (g_want,) = torch.autograd.grad(want.sum(), x)
    (g_got,) = torch.autograd.grad(got.sum(), x)
    torch.testing.assert_close(g_got, g_want)
    m.eval()
    inductor = torch.compile(m, fullgraph=True)
    torch.testing.assert_close(inductor(x.detach()), m(x.detach()))


def _tiny_llama_peft():
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(6)
    cfg = transformers.LlamaConfig(
        vocab_size=61,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(cfg)
    lcfg = peft.LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
    )  # fmt: skip
    pm = peft.get_peft_model(model, lcfg)
    _randomise_b(pm)
    return pm


def _logits_and_lora_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}
    return out.logits.detach(), grads


@pytest.mark.parametrize("backend", BACKENDS)
def test_peft_llama_patched_same_logits_and_grads(backend):
    pm = _tiny_llama_peft()
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(0))
    keys_before = list(pm.state_dict())
    want_logits, want_grads = _logits_and_lora_grads(pm, ids)
    replaced = convert_peft_lora(pm)
    assert len(replaced) == 12
    assert all(isinstance(pm.get_submodule(n), LoRALinear) for n in replaced)
    assert list(pm.state_dict()) == keys_before
    with dlcore.backend(backend):
        logits, grads = _logits_and_lora_grads(pm, ids)
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)
    assert grads.keys() == want_grads.keys() and len(grads) == 24
    for name, g in grads.items():
        torch.testing.assert_close(g, want_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    restored = restore_peft_lora(pm)
    assert restored == replaced
    logits_back, _ = _logits_and_lora_grads(pm, ids)
    torch.testing.assert_close(logits_back, want_logits)


def test_dlcore_patch_uses_from_peft():
    pm = _tiny_llama_peft()
    ids = torch.randint(0, 61, (1, 5), generator=torch.Generator().manual_seed(1))
    want = pm(input_ids=ids).logits
    report = dlcore.patch(pm, families=("lora",))
    lora_entries = [e for e in report.replaced if e.family == "lora"]
    assert len(lora_entries) == 12
    torch.testing.assert_close(pm(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    dlcore.unpatch(pm)
    assert not any(isinstance(m, LoRALinear) for m in pm.modules())


def test_from_peft_rejects_dora():
    peft = pytest.importorskip("peft")
    model = nn.Sequential(nn.Linear(8, 8))
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["0"], use_dora=True))
    with pytest.raises(ValueError, match="LoRA variant"):
        LoRALinear.from_peft(pm.base_model.model[0])
