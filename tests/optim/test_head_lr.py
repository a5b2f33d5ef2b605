"""optim.head_lr_scale: a scalar head's parameters train at lr * head_lr_scale, the trunk at lr.

Checked through DeepSpeed (ZeRO 1, fp32) on a spawned gloo rank with the first Adam step, whose
size is known by hand: bias-corrected m / sqrt(v) is g / |g| on step one, so every parameter with
a gradient well above eps moves by exactly its group's learning rate (no decay, no clipping)."""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist

from megarlhf.config.optim import OptimConfig
from megarlhf.model.gpt import GPTModel
from megarlhf.optim.adamw import param_groups
from megarlhf.parallel.state import build_parallel_state, single_process_state
from tests.dist import run_ranks
from tests.model.common import tiny_config

LR, SCALE = 1e-3, 10.0


def _scalar_model(seed: int = 3) -> GPTModel:
    cfg = dataclasses.replace(tiny_config("llama"), head="scalar")
    return GPTModel(cfg, single_process_state(), seed=seed)


def test_groups_put_the_scalar_head_apart_only_when_asked():
    model = _scalar_model()
    names = {id(p): n for n, p in model.named_parameters()}
    plain = param_groups(model, 0.1)
    assert len(plain) == 2 and all("lr" not in g for g in plain)
    split = param_groups(model, 0.1, head_lr=0.5)
    head = [g for g in split if "lr" in g]
    assert [sorted(names[id(p)] for p in g["params"]) for g in head] == [
        ["head.weight"],
        ["head.bias"],
    ]
    assert [(g["lr"], g["weight_decay"]) for g in head] == [(0.5, 0.1), (0.5, 0.0)]
    trunk = {names[id(p)] for g in split if "lr" not in g for p in g["params"]}
    assert trunk == {n for n in names.values() if not n.startswith("head.")}
    # An LM-head model has no scalar head: head_lr changes nothing.
    lm = GPTModel(tiny_config("llama"), single_process_state(), seed=3)
    assert len(param_groups(lm, 0.1, head_lr=0.5)) == 2


def _first_step(rank, world):
    os.environ["LOCAL_RANK"] = str(rank)
    from megarlhf.config.optim import DeepSpeedConfig
    from megarlhf.optim.deepspeed_model import DeepSpeedModel

    ps = build_parallel_state(1, 1)
    module = GPTModel(dataclasses.replace(tiny_config("llama"), head="scalar"), ps, seed=3)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    optim = OptimConfig(impl="torch", lr=LR, head_lr_scale=SCALE, clip_grad=0.0, eps=1e-12)
    engine = DeepSpeedModel(
        module, ps, optim=optim, deepspeed=DeepSpeedConfig(zero_stage=1),
        micro_batch_size=2, grad_accum=1, total_steps=4,
    )  # fmt: skip
    ids = torch.randint(0, 1003, (2, 8), generator=torch.Generator().manual_seed(0))
    engine.begin_step(1)
    engine.backward((engine(ids).float() ** 2).mean())
    stats = engine.step()
    moved = {
        n: float((p.detach() - before[n]).abs().max()) for n, p in engine.module.named_parameters()
    }
    dist.barrier()
    return {"moved": moved, "lr": stats["lr"]}


def test_deepspeed_steps_the_head_at_its_scaled_rate():
    (r,) = run_ranks(_first_step, 1, timeout=240)
    assert abs(r["lr"] - LR) < 1e-12  # the trunk's rate is the one reported
    moved = r["moved"]
    for name in ("head.weight", "head.bias"):
        assert abs(moved[name] - LR * SCALE) < 1e-6, (name, moved[name])
    trunk = {n: m for n, m in moved.items() if not n.startswith("head.")}
    assert trunk and all(m < LR * 1.0001 for m in trunk.values()), trunk
    assert max(trunk.values()) > LR * 0.999
