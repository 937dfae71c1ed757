"""dlcore.nn.MambaMixer against transformers' MambaMixer slow path: logits, greedy generation with
the cache (prefill + decode), padding masks, gradients, parameter layout, swap and restore."""

from __future__ import annotations

import pytest
import torch
from conftest import backends_for

import dlcore
from dlcore.nn import MambaMixer
from dlcore.nn.scan import replace_mamba_mixers, restore_mamba_mixers

transformers = pytest.importorskip("transformers")

BACKENDS = backends_for("cpu", ("cpu", "eager"))


def tiny_model(seed: int = 0) -> torch.nn.Module:
    config = transformers.MambaConfig(
        vocab_size=101, hidden_size=32, state_size=16, num_hidden_layers=2, intermediate_size=48,
        conv_kernel=4, time_step_rank=5, use_mambapy=False, use_associative_scan=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.MambaForCausalLM(config).eval()
    # Random init leaves A_log/D/dt at their structured defaults; perturb them so every
    # channel differs and the test sees the per-channel parameters.
    with torch.no_grad():
        for layer in model.backbone.layers:
            layer.mixer.A_log.add_(0.3 * torch.randn_like(layer.mixer.A_log))
            layer.mixer.D.add_(0.5 * torch.randn_like(layer.mixer.D))
    return model


def test_from_hf_shares_parameters():
    model = tiny_model()
    hf = model.backbone.layers[0].mixer
    ours = MambaMixer.from_hf(hf)
    assert dict(ours.named_parameters()).keys() == dict(hf.named_parameters()).keys()
    for (name, p), (_, q) in zip(ours.named_parameters(), hf.named_parameters(), strict=True):
        assert p is q, name
    fresh = MambaMixer(32, 48, state_size=16, conv_kernel=4, time_step_rank=5)
    for (name, p), (_, q) in zip(fresh.named_parameters(), hf.named_parameters(), strict=True):
        assert p.shape == q.shape, name
    fresh.load_state_dict(hf.state_dict())


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_match_hf_slow_path(backend):
    model = tiny_model()
    ids = torch.randint(0, 101, (2, 37), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    with torch.no_grad():
        ref = model(ids).logits
        ref_masked = model(ids, attention_mask=mask).logits
    replaced = replace_mamba_mixers(model)
    assert sorted(replaced) == ["backbone.layers.0.mixer", "backbone.layers.1.mixer"]
    assert all(isinstance(layer.mixer, MambaMixer) for layer in model.backbone.layers)
    with torch.no_grad(), dlcore.backend(backend):
        got = model(ids).logits
        got_masked = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_masked, ref_masked, rtol=1e-4, atol=1e-4)
    restore_mamba_mixers(model, replaced)
    assert type(model.backbone.layers[0].mixer).__module__.startswith("transformers.")


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_generation_matches_hf(backend):
    model = tiny_model(seed=2)
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(3))
    kwargs = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, use_cache=True)
    with torch.no_grad():
        ref = model.generate(ids, **kwargs)
    replaced = replace_mamba_mixers(model)
    with torch.no_grad(), dlcore.backend(backend):
        got = model.generate(ids, **kwargs)
    restore_mamba_mixers(model, replaced)
    assert got.shape == ref.shape == (2, 9 + 32)
    assert torch.equal(got, ref)


def test_cached_decode_matches_full_forward():
    """Prefill then one-token decode steps reproduce the logits of the full sequence."""
    model = tiny_model(seed=4)
    replace_mamba_mixers(model)
    ids = torch.randint(0, 101, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :8], use_cache=True)
        steps = [out.logits]
        for t in range(8, 12):
            out = model(ids[:, t : t + 1], cache=out.cache, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)


def test_gradients_match_hf_slow_path():
    model = tiny_model(seed=6).train()
    ids = torch.randint(0, 101, (2, 21), generator=torch.Generator().manual_seed(7))
    ref_loss = model(ids, labels=ids).loss
    ref_grads = torch.autograd.grad(ref_loss, list(model.parameters()))
    replace_mamba_mixers(model)
    loss = model(ids, labels=ids).loss
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5, msg=name)
