"""A dlcore-patched model compiles with ``torch.compile(fullgraph=True)`` (no graph breaks from
dlcore) and gives the unpatched model's outputs and gradients, on dlcore's cpu and eager backends.

``aot_eager`` runs Dynamo and AOT autograd (the parts dlcore's op registrations must support:
fake impls, autograd formulas, no Python side effects) without Inductor's C++ build time;
one case also goes through Inductor.
"""

import copy

import pytest
import torch

import dlcore
import dlcore.nn

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

RTOL, ATOL = 1e-4, 1e-5
BACKENDS = [
    pytest.param(
        b,
        marks=[pytest.mark.skip(reason=f"{b}: {dlcore.backends()[b].detail}")]
        if not dlcore.backends()[b].available
        else [],
    )
    for b in ("cpu", "eager")
]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def lora_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=67,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    lora = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
        lora_dropout=0.0,
        init_lora_weights=False,
    )
    return peft.get_peft_model(transformers.LlamaForCausalLM(cfg), lora)


def patched_copy(ref: torch.nn.Module, expect: dict[str, int]) -> torch.nn.Module:
    model = copy.deepcopy(ref)
    report = dlcore.patch(model)
    counts = report.counts()
    for family, n in expect.items():
        if counts.get(family, 0) != n:
            pytest.fail(f"expected {n} {family} replacements, got {counts}:\n{report}")
    return model


def expected_llama_families() -> dict[str, int]:
    if getattr(dlcore.nn, "LoRALinear", None) is None:
        pytest.skip("dlcore.nn.LoRALinear is not available in this checkout")
    expect = {"lora": 8}
    if "dlcore" in transformers.AttentionInterface._global_mapping:
        expect["attention"] = 1  # the attention family has landed: it must be in the graph too
    return expect


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_llama_train_step_fullgraph(backend):
    ref = lora_llama()
    model = patched_copy(ref, expected_llama_families())
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    ids = torch.randint(0, 67, (2, 11))
    with dlcore.backend(backend):
        out = compiled(input_ids=ids, labels=ids)
        out.loss.backward()
    out_ref = ref(input_ids=ids, labels=ids)
    out_ref.loss.backward()
    torch.testing.assert_close(out.logits, out_ref.logits, rtol=RTOL, atol=ATOL)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    assert grads.keys() == ref_grads.keys() and len(grads) == 16
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=RTOL, atol=ATOL, msg=name)


def test_lora_llama_inductor_forward():
    ref = lora_llama().eval()
    model = patched_copy(ref, expected_llama_families())
    compiled = torch.compile(model, fullgraph=True)  # Inductor, C++ codegen on CPU
    ids = torch.randint(0, 67, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(
            compiled(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=RTOL, atol=ATOL
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_mamba_forward_backward_fullgraph(backend):
    if getattr(dlcore.nn, "MambaMixer", None) is None:
        pytest.skip("dlcore.nn.MambaMixer is not available in this checkout")
    torch.manual_seed(0)
    cfg = transformers.MambaConfig(
        vocab_size=53, hidden_size=24, state_size=8, num_hidden_layers=2, expand=2
    )
    ref = transformers.MambaForCausalLM(cfg)
    model = patched_copy(ref, {"scan": 2})
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    ids = torch.randint(0, 53, (2, 13))
    with dlcore.backend(backend):
        out = compiled(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
    out_ref = ref(input_ids=ids, labels=ids, use_cache=False)
    out_ref.loss.backward()
    torch.testing.assert_close(out.logits, out_ref.logits, rtol=RTOL, atol=ATOL)
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=RTOL, atol=ATOL, msg=name)
