"""Attention drop-ins: dlcore.nn.MultiheadAttention against torch.nn.MultiheadAttention, the
transformers "dlcore" attention function against "eager", the diffusers processor against
AttnProcessor2_0."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dlcore.nn as dnn


def _mha_pair(**kwargs):
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(**kwargs)
    torch.manual_seed(0)
    ours = dnn.MultiheadAttention(**kwargs)
    return ref, ours


def _inputs(n, lq, s, e, kdim, vdim, batch_first, seed=1):
    g = torch.Generator().manual_seed(seed)

    def make(length, dim):
        shape = (n, length, dim) if batch_first else (length, n, dim)
        return torch.randn(shape, generator=g, requires_grad=True)

    return make(lq, e), make(s, kdim), make(s, vdim)


def _assert_close(a, b, what):
    torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5, msg=lambda m: f"{what}: {m}")


MHA_CONFIGS = [
    pytest.param({}, id="default"),
    pytest.param({"batch_first": True}, id="batch_first"),
    pytest.param({"kdim": 12, "vdim": 20}, id="kdim-vdim"),
    pytest.param({"bias": False, "batch_first": True}, id="no-bias"),
    pytest.param({"add_bias_kv": True}, id="bias_kv"),
    pytest.param({"add_zero_attn": True, "batch_first": True}, id="zero_attn"),
    pytest.param({"add_bias_kv": True, "add_zero_attn": True, "kdim": 8}, id="bias_kv-zero"),
]

MASKS = [
    pytest.param("none", id="nomask"),
    pytest.param("bool2d", id="bool-attn_mask"),
    pytest.param("float3d", id="float-3d-attn_mask"),
    pytest.param("kpm", id="key_padding_mask"),
    pytest.param("both", id="attn_mask+kpm"),
]


def _masks(kind, n, h, lq, s):
    g = torch.Generator().manual_seed(5)
    attn_mask = kpm = None
    if kind in ("bool2d", "both"):
        attn_mask = torch.rand(lq, s, generator=g) < 0.3
        attn_mask[:, 0] = False  # every row keeps a key (torch gives NaN rows otherwise)
    if kind == "float3d":
        attn_mask = torch.randn(n * h, lq, s, generator=g)
    if kind in ("kpm", "both"):
        kpm = torch.zeros(n, s, dtype=torch.bool)
        kpm[0, -3:] = True
    return attn_mask, kpm


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("config", MHA_CONFIGS)
@pytest.mark.parametrize("need_weights,average", [(True, True), (True, False), (False, True)])
def test_mha_matches_torch(config, mask, need_weights, average):
    e, h, n, lq, s = 16, 4, 2, 9, 11
    kwargs = {"embed_dim": e, "num_heads": h, **config}
    ref, ours = _mha_pair(**kwargs)
    assert list(ours.state_dict()) == list(ref.state_dict())
    for (name, p), (_, p_ref) in zip(ours.named_parameters(), ref.named_parameters(), strict=True):
        assert torch.equal(p, p_ref), f"{name} initialised differently"
    kdim, vdim = kwargs.get("kdim", e), kwargs.get("vdim", e)
    bf = kwargs.get("batch_first", False)
    attn_mask, kpm = _masks(mask, n, h, lq, s)
    results = []
    for module in (ref, ours):
        q, k, v = _inputs(n, lq, s, e, kdim, vdim, bf)
        out, w = module(
            q, k, v, key_padding_mask=kpm, need_weights=need_weights, attn_mask=attn_mask,
            average_attn_weights=average,
        )  # fmt: skip
        (out.square().sum() + (w.sum() if w is not None else 0)).backward()
        grads = [t.grad for t in (q, k, v)] + [p.grad for p in module.parameters()]
        results.append((out, w, grads))
        module.zero_grad()
    (o_ref, w_ref, g_ref), (o, w, g) = results
    _assert_close(o, o_ref, "output")
    if need_weights:
        _assert_close(w, w_ref, "weights")
    else:
        assert w is None and w_ref is None
    for i, (a, b) in enumerate(zip(g, g_ref, strict=True)):
        _assert_close(a, b, f"grad {i}")


def test_mha_self_attention_unbatched_and_causal_hint():
    e, h, lq = 24, 3, 13
    ref, ours = _mha_pair(embed_dim=e, num_heads=h)
    x = torch.randn(lq, e)
    causal = nn.Transformer.generate_square_subsequent_mask(lq)
    for kwargs in (
        {},
        {"attn_mask": causal, "is_causal": True, "need_weights": False},
        {"attn_mask": causal, "is_causal": True},
    ):
        o_ref, w_ref = ref(x, x, x, **kwargs)
        o, w = ours(x, x, x, **kwargs)
        _assert_close(o, o_ref, f"output {list(kwargs)}")
        if w_ref is not None:
            _assert_close(w, w_ref, "weights")
    with pytest.raises(RuntimeError, match="Need attn_mask if specifying the is_causal hint"):
        ours(x, x, x, is_causal=True)


def test_mha_from_torch_shares_parameters_and_bad_shapes():
    ref = nn.MultiheadAttention(16, 2, batch_first=True, kdim=6, vdim=6)
    ours = dnn.MultiheadAttention.from_torch(ref)
    assert isinstance(ours, dnn.MultiheadAttention)
    assert all(a is b for a, b in zip(ours.parameters(), ref.parameters(), strict=True))
    x, kv = torch.randn(2, 5, 16), torch.randn(2, 7, 6)
    _assert_close(ours(x, kv, kv)[0], ref(x, kv, kv)[0], "from_torch output")
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(2, 7\)"):
        ours(x, kv, kv, key_padding_mask=torch.zeros(2, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"attn_mask must have shape \(5, 7\) or \(4, 5, 7\)"):
        ours(x, kv, kv, attn_mask=torch.zeros(5, 6))
    with pytest.raises(ValueError, match="key/value feature dims 16/16 != kdim/vdim 6/6"):
        ours(x, x, x)
    with pytest.raises(TypeError, match="expects a torch.nn.MultiheadAttention"):
        dnn.MultiheadAttention.from_torch(nn.Linear(2, 2))


def test_mha_dropout_in_training_only():
    ours = dnn.MultiheadAttention(16, 2, dropout=0.5, batch_first=True)
    x = torch.randn(2, 8, 16)
    ours.eval()
    o_eval = ours(x, x, x, need_weights=False)[0]
    ours.train()
    torch.manual_seed(3)
    o1 = ours(x, x, x, need_weights=False)[0]
    torch.manual_seed(3)
    o2 = ours(x, x, x, need_weights=False)[0]
    assert torch.equal(o1, o2)  # the dropout seed comes from torch's generator
    assert not torch.allclose(o1, o_eval)


# ---------------------------------------------------------------------------------------------
# transformers
# ---------------------------------------------------------------------------------------------


def _compare_models(make_model, inputs, atol=2e-5):
    # Padding query rows see no key: eager spreads them uniformly, dlcore gives 0. Their logits
    # are meaningless either way, so compare (and differentiate) the real tokens only.
    valid = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])).bool()
    outs = []
    for impl in ("eager", "dlcore"):
        torch.manual_seed(0)
        model = make_model(impl)
        model.train(False)
        out = model(**inputs).logits[valid]
        out.float().square().mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        outs.append((out.detach(), grads, model.config._attn_implementation))
    (ref, g_ref, impl_ref), (out, g, impl) = outs
    assert (impl_ref, impl) == ("eager", "dlcore")
    torch.testing.assert_close(out, ref, atol=atol, rtol=atol)
    assert g.keys() == g_ref.keys()
    for name in g:
        torch.testing.assert_close(g[name], g_ref[name], atol=atol, rtol=atol, msg=name)


def test_llama_gqa_matches_eager_with_padding():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    ids = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 19, dtype=torch.long)
    mask[1, :5] = 0  # left padding

    def make(impl):
        return transformers.LlamaForCausalLM._from_config(cfg, attn_implementation=impl)

    _compare_models(make, {"input_ids": ids})
    _compare_models(make, {"input_ids": ids, "attention_mask": mask})


def test_bert_bidirectional_matches_eager():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=40,
    )  # fmt: skip
    ids = torch.randint(0, 50, (3, 17), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 17, dtype=torch.long)
    mask[0, 12:] = 0

    def make(impl):
        return transformers.BertForMaskedLM._from_config(cfg, attn_implementation=impl)

    _compare_models(make, {"input_ids": ids, "attention_mask": mask})


def test_gemma2_softcap_and_sliding_window_match_eager():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Gemma2Config(
        vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=6,
        attn_logit_softcapping=5.0, final_logit_softcapping=None, max_position_embeddings=64,
    )  # fmt: skip
    ids = torch.randint(0, 61, (2, 21), generator=torch.Generator().manual_seed(2))

    def make(impl):
        return transformers.Gemma2ForCausalLM._from_config(cfg, attn_implementation=impl)

    _compare_models(make, {"input_ids": ids})


def test_llama_generate_with_cache_matches_eager():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64,
    )  # fmt: skip
    ids = torch.randint(0, 97, (1, 7), generator=torch.Generator().manual_seed(4))
    generated = []
    for impl in ("eager", "dlcore"):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation=impl).eval()
        with torch.no_grad():
            generated.append(model.generate(ids, max_new_tokens=6, do_sample=False))
    assert torch.equal(generated[0], generated[1])


def test_transformers_function_direct_call_and_refusals():
    pytest.importorskip("transformers")
    from transformers import AttentionInterface

    assert AttentionInterface._global_mapping["dlcore"] is dnn.transformers_attention_forward
    module = nn.Module()
    module.is_causal = True
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    out, weights = dnn.transformers_attention_forward(module, q, k, v, None, scaling=0.3)
    # Lq < Lk causal without a mask: transformers' sdpa keeps the first Lq keys (static cache).
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k[:, :, :5].repeat_interleave(2, 1), v[:, :, :5].repeat_interleave(2, 1),
        is_causal=True, scale=0.3,
    )  # fmt: skip
    assert weights is None
    torch.testing.assert_close(out, ref.transpose(1, 2), atol=1e-5, rtol=1e-5)
    with pytest.raises(NotImplementedError, match="attention sinks"):
        dnn.transformers_attention_forward(module, q, k, v, None, s_aux=torch.zeros(4))


# ---------------------------------------------------------------------------------------------
# diffusers
# ---------------------------------------------------------------------------------------------


def test_unet_with_dlcore_processor_matches_attnprocessor2_0():
    diffusers = pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import AttnProcessor2_0

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
        attention_head_dim=8, norm_num_groups=8,
    ).eval()  # fmt: skip
    sample = torch.randn(2, 4, 8, 8)
    context = torch.randn(2, 5, 24)
    unet.set_attn_processor(AttnProcessor2_0())
    context_mask = torch.ones(2, 5)
    context_mask[1, 3:] = 0

    def run():
        with torch.no_grad():
            plain = unet(sample, 3, encoder_hidden_states=context).sample
            masked = unet(
                sample, 3, encoder_hidden_states=context, encoder_attention_mask=context_mask
            ).sample
        return plain, masked

    ref, ref_masked = run()
    processors = unet.attn_processors
    unet.set_attn_processor(
        {name: dnn.AttnProcessor.for_attention(None, p) for name, p in processors.items()}
    )
    assert all(isinstance(p, dnn.AttnProcessor) for p in unet.attn_processors.values())
    out, out_masked = run()
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out_masked, ref_masked, atol=2e-5, rtol=2e-5)
    assert not torch.allclose(out_masked, out)


def test_processor_refuses_other_processors():
    pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import AttnAddedKVProcessor2_0

    with pytest.raises(NotImplementedError, match="not AttnAddedKVProcessor2_0"):
        dnn.AttnProcessor.for_attention(None, AttnAddedKVProcessor2_0())
