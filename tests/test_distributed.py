"""A dlcore-patched LoRA Llama trains the same under DDP / FSDP2 (2 gloo processes on CPU) as in
one process on the combined batch: same losses, same LoRA gradients, same weights after 3 steps."""

import faulthandler
import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dlcore

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

WORLD = 2
STEPS = 3
BATCH = 4  # combined batch; each rank takes BATCH // WORLD rows
SEQ = 9  # odd on purpose
# A worker still alive after WORKER_LIMIT_S prints every thread's stack to the test log and exits,
# so a stuck collective or teardown fails the test with the place it stuck, and never stalls CI.
WORKER_LIMIT_S = 240


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
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
    lora = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
        lora_dropout=0.0,
        init_lora_weights=False,  # B != 0, so A's gradient is not trivially zero
    )
    model = peft.get_peft_model(model, lora)
    report = dlcore.patch(model, families=("lora", "attention"))
    model._dlcore_counts = report.counts()
    return model


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 61, (BATCH, SEQ), generator=g) for _ in range(STEPS)]


def _lora_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}  # keyed by the unwrapped model's names (DDP prefixes "module.")
    for name, p in model.named_parameters():
        if p.requires_grad:
            g = p.grad
            if hasattr(g, "full_tensor"):  # FSDP2 shards gradients as DTensors
                g = g.full_tensor()
            out[name.removeprefix("module.")] = g.detach().clone()
    return out


def _lora_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            t = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[name.removeprefix("module.")] = t.detach().clone()
    return out


def _train(model: torch.nn.Module, rows: slice, reduce_loss) -> dict:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    losses, grads = [], []
    for ids in _batches():
        ids = ids[rows]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(reduce_loss(loss.detach()))
        grads.append(_lora_grads(model))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {"losses": losses, "grads": grads, "params": _lora_params(model)}


def _worker(rank: int, port: int, mode: str, out_dir: str) -> None:
    faulthandler.dump_traceback_later(WORKER_LIMIT_S, exit=True)
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # A bounded timeout: a stuck collective fails the test instead of stalling CI for 30 min.
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120))
    try:
        model = _model()
        if mode == "ddp":
            wrapped = torch.nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard

            for layer in model.base_model.model.model.layers:
                fully_shard(layer)
            wrapped = fully_shard(model)

        def mean_over_ranks(loss: torch.Tensor) -> float:
            dist.all_reduce(loss)
            return loss.item() / WORLD

        per_rank = BATCH // WORLD
        result = _train(wrapped, slice(rank * per_rank, (rank + 1) * per_rank), mean_over_ranks)
        result["counts"] = model._dlcore_counts
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        # Tear down together: a rank leaving first took the store with it and the other rank
        # hung in destroy_process_group (about 1 run in 4 here).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def single_process() -> dict:
    model = _model()
    result = _train(model, slice(None), lambda loss: loss.item())
    result["counts"] = model._dlcore_counts
    return result


def _run(mode: str, tmp_path, reference: dict) -> None:
    ctx = mp.spawn(_worker, args=(_free_port(), mode, str(tmp_path)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + WORKER_LIMIT_S + 60
    while not ctx.join(timeout=5):  # raises when a worker fails or exits early
        if time.monotonic() > deadline:  # the workers' own limit did not fire
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"{mode} workers still running after {WORKER_LIMIT_S + 60} s; killed")
    for rank in range(WORLD):
        got = torch.load(os.path.join(tmp_path, f"rank{rank}.pt"))
        # The test is about dlcore modules, so they must really have been swapped in.
        assert got["counts"] == reference["counts"], got["counts"]
        torch.testing.assert_close(got["losses"], reference["losses"], rtol=1e-5, atol=1e-6)
        for step, (g, ref) in enumerate(zip(got["grads"], reference["grads"], strict=True)):
            assert g.keys() == ref.keys()
            for name in ref:
                torch.testing.assert_close(
                    g[name], ref[name], rtol=1e-4, atol=1e-6, msg=f"step {step} {name}"
                )
        for name, p in reference["params"].items():
            torch.testing.assert_close(got["params"][name], p, rtol=1e-4, atol=1e-6, msg=name)


def _require_lora() -> None:
    if getattr(dlcore.nn, "LoRALinear", None) is None:
        pytest.skip("dlcore.nn.LoRALinear is not available in this checkout")


def test_single_process_reference_is_patched(single_process):
    _require_lora()
    expect = {"lora": 8}
    if "dlcore" in transformers.AttentionInterface._global_mapping:
        expect["attention"] = 1  # attention runs through dlcore's transformers function too
    assert single_process["counts"] == expect
    # Losses must move, else matching them across setups would prove nothing.
    assert single_process["losses"][0] != single_process["losses"][-1]
    assert all(g.abs().sum() > 0 for g in single_process["grads"][0].values())


def test_ddp_matches_single_process(single_process, tmp_path):
    _require_lora()
    _run("ddp", tmp_path, single_process)


def test_fsdp2_matches_single_process(single_process, tmp_path):
    _require_lora()
    _run("fsdp2", tmp_path, single_process)
