"""LoRA under tensor parallelism (spawned gloo ranks): TP=2 logits and adapter gradients equal
TP=1 (fp32, rel <= 1e-5), the initialization is layout-independent, the hybrid engine's merged
generation copy (TP=2 -> TP=1) equals the adapted model; and under DeepSpeed (DP=2, ZeRO 1) only
the adapters have optimizer state, a step leaves the base bitwise unchanged, and DeepSpeed's
checkpoint holds no frozen tensor."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megarlhf.config import GenerationConfig
from megarlhf.config.model import LoRAConfig
from megarlhf.engine.hybrid import HybridEngine
from megarlhf.model.gpt import GPTModel
from megarlhf.model.lora import has_adapters
from megarlhf.parallel.mappings import gather_from_tensor_parallel_region
from megarlhf.parallel.state import build_parallel_state, single_process_state
from tests.dist import run_ranks
from tests.model.common import gather_full, rel_err, tiny_config
from tests.model.test_lora import randomize_adapters

CASES = [
    ("gpt2", {}),
    ("llama", {}),  # GQA 8q / 4kv, untied, fused gate|up
    ("llama", {"num_heads": 6, "num_kv_heads": 3, "hidden_size": 48}),  # uneven 2|1 kv heads
]


def _loss(logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    real = logits[..., : weights.shape[-1]]
    return (real * weights).sum() + real.logsumexp(-1).sum()


def _case(family: str, extra: dict, ps) -> dict:
    cfg = tiny_config(family, lora=LoRAConfig(rank=3, alpha=6.0), **extra)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    weights = torch.randn(2, 9, cfg.vocab_size, generator=g)
    ref = GPTModel(cfg, single_process_state(), seed=7)
    randomize_adapters(ref)
    ref_logits = ref(ids, attention_mask=mask)
    _loss(ref_logits, weights).backward()

    model = GPTModel(cfg, ps, seed=7)
    randomize_adapters(model)
    logits = gather_from_tensor_parallel_region(model(ids, attention_mask=mask), ps.tp_group)
    _loss(logits, weights).backward()
    v = slice(0, cfg.vocab_size)
    errors = {"logits": rel_err(logits[..., v], ref_logits[..., v])}
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        if not p.requires_grad:
            errors[f"frozen has grad: {name}"] = 0.0 if p.grad is None else 1.0
            continue
        spec = model.plan[name]
        full_grad = gather_full(p.grad, ps.tp_group, spec)
        errors["grad:" + name] = rel_err(full_grad, ref_params[name].grad)
        if name.endswith(".lora.a"):  # initialized from the full tensor, sharded
            errors["init:" + name] = rel_err(gather_full(p.detach(), ps.tp_group, spec),
                                             ref_params[name].detach())  # fmt: skip
    # The generation copy at TP=1 (every rank a whole model): merged W + s B A.
    engine = HybridEngine(model, build_parallel_state(1, 1), GenerationConfig(), None, 0)
    copy = engine.build_generation_model()
    errors["copy has no adapters"] = float(has_adapters(copy))
    with torch.no_grad():
        merged = copy(ids, attention_mask=mask)
    errors["merged copy logits"] = rel_err(merged[..., v], ref_logits[..., v])
    return errors


def _tp_vs_single(rank, world):
    ps = build_parallel_state(tp=2)
    out = {f"{f}-{i}": _case(f, extra, ps) for i, (f, extra) in enumerate(CASES)}
    dist.barrier()
    return out


def test_tensor_parallel_lora_matches_single_process():
    for rank, by_case in enumerate(run_ranks(_tp_vs_single, 2, timeout=240)):
        for case, errors in by_case.items():
            bad = {k: v for k, v in errors.items() if not v <= 1e-5}
            assert not bad, f"rank {rank}, {case}: relative errors above 1e-5: {bad}"
            assert sum(k.startswith("grad:") for k in errors) == 3 * 4 * 2  # 3 layers, 4 linears


def _deepspeed_dp2(rank, world, out_dir):
    os.environ["LOCAL_RANK"] = str(rank)
    from megarlhf.config.optim import DeepSpeedConfig, OptimConfig
    from megarlhf.optim.deepspeed_model import DeepSpeedModel

    ps = build_parallel_state(1, 1)
    cfg = tiny_config("gpt2", lora=LoRAConfig(rank=2, target_modules=["qkv", "fc1"]))
    module = GPTModel(cfg, ps, seed=3)
    frozen = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    engine = DeepSpeedModel(
        module, ps, optim=OptimConfig(impl="torch", lr=1e-2),
        deepspeed=DeepSpeedConfig(zero_stage=1), micro_batch_size=2, grad_accum=1, total_steps=4,
    )  # fmt: skip
    ids = torch.randint(0, cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(rank))
    engine.begin_step(1)
    engine.backward(engine(ids).float().logsumexp(-1).mean())
    engine.step()
    opt = engine.optimizer
    partition = sum(t.numel() for t in opt.single_partition_of_fp32_groups)
    changed = [n for n, p in engine.module.named_parameters() if n in frozen
               and not torch.equal(p.detach(), frozen[n])]  # fmt: skip
    moved = [n for n, p in engine.module.named_parameters() if n.endswith(".lora.b")
             and p.detach().abs().sum() > 0]  # fmt: skip
    engine.save_state(out_dir)
    module_file = next((Path(out_dir) / "deepspeed" / "state").glob("mp_rank_00_model_states.pt"))
    saved = set(torch.load(module_file, weights_only=False)["module"])
    dist.barrier()
    return {"partition": partition, "trainable": trainable, "changed": changed,
            "moved": len(moved), "saved": sorted(saved)}  # fmt: skip


def test_deepspeed_sees_only_the_adapters(tmp_path):
    results = run_ranks(_deepspeed_dp2, 2, str(tmp_path), timeout=240)
    cfg = tiny_config("gpt2", lora=LoRAConfig(rank=2, target_modules=["qkv", "fc1"]))
    for r in results:
        # ZeRO 1 over DP=2: each rank's fp32 master partition is half the trainable elements
        # (DeepSpeed pads to an alignment), none of the frozen base.
        assert r["trainable"] / 2 <= r["partition"] <= r["trainable"] / 2 + 64
        assert r["changed"] == [] and r["moved"] == 2 * cfg.num_layers
        assert all(".lora." in n for n in r["saved"]) and len(r["saved"]) == 4 * cfg.num_layers


@pytest.mark.parametrize("zero", [3])
def test_zero3_with_lora_is_refused(zero, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    from megarlhf.config import ConfigError
    from megarlhf.config.optim import DeepSpeedConfig, OptimConfig
    from megarlhf.optim.deepspeed_model import DeepSpeedModel

    cfg = dataclasses.replace(tiny_config("gpt2"), lora=LoRAConfig(rank=2))
    module = GPTModel(cfg, single_process_state(), seed=3)
    with pytest.raises(ConfigError, match="deepspeed.zero_stage: 3"):
        DeepSpeedModel(
            module, single_process_state(), optim=OptimConfig(),
            deepspeed=DeepSpeedConfig(zero_stage=zero), micro_batch_size=1, grad_accum=1,
            total_steps=1,
        )  # fmt: skip
