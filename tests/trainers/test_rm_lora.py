"""Reward-model training with LoRA (model.lora.rank > 0): adapters on the trunk, the fresh scalar
head trained in full (configs/rm_tiny.yaml, one rank, started from a language-model checkpoint).

Checked against independent references: every frozen tensor is still the checkpoint's after
training; the checkpoint stores the adapters and the head only; and its merged model, loaded into
a plain model without adapters, gives in plain torch (pair by pair) the run's held-out loss, and
a demonstration mean of 0 (the reward normalization moved the trained head's bias).
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open

from megarlhf.checkpoint import atomic
from tests.dist import run_ranks
from tests.trainers.common import EXT_DIR, QUIET, ROOT, final_weights, metrics
from tests.trainers.rm_common import (
    RM_TINY,
    demo_reward_mean,
    last_token_rewards,
    pairwise_loss,
    save_lm_checkpoint,
)

EVAL_PROMPTS = 16
RUN = QUIET + [
    "rm.max_steps=4",
    "rm.micro_batch_size=4",
    "rm.global_batch_size=8",
    "rm.eval_every=0",
    "checkpoint.keep_last=1",
    "optim.warmup_steps=1",
    "optim.lr=1e-2",
    "model.lora.rank=4",
    "model.lora.alpha=8",
]


def _train(rank, world, out, init, held_out):
    os.environ["LOCAL_RANK"] = str(rank)
    os.chdir(ROOT)
    from megarlhf.config import load_config
    from megarlhf.config.rm import RMRunConfig
    from megarlhf.model.gpt import GPTModel
    from megarlhf.model.lora import base_config
    from megarlhf.parallel.state import build_parallel_state
    from megarlhf.trainers.rm import RMTrainer

    extra = [f"checkpoint.init_from={init}", f"rm.eval_files=[{held_out}]"]
    cfg = load_config(RMRunConfig, RM_TINY, RUN + extra)
    ps = build_parallel_state(1, 1)
    trainer = RMTrainer(cfg, ps, out)
    trainer.train()
    fresh = GPTModel(base_config(cfg.model), ps, seed=cfg.rm.loop.seed)  # the head it started at
    return {
        "weights": {n: p.detach().clone() for n, p in trainer.model.module.named_parameters()},
        "fresh_head": fresh.head.weight.detach().clone(),
        "trainable": sorted(
            n for n, p in trainer.model.module.named_parameters() if p.requires_grad
        ),  # fmt: skip
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", EXT_DIR)
    import dataclasses

    from megarlhf.config import load_config
    from megarlhf.config.rm import RMRunConfig

    tmp = tmp_path_factory.mktemp("rm_lora")
    lm = dataclasses.replace(load_config(RMRunConfig, RM_TINY).model, head="lm")
    init = save_lm_checkpoint(tmp / "lm", lm, seed=11)
    held_out = tmp / "held_out.jsonl"
    lines = (ROOT / "data" / "rm_tiny_eval.jsonl").read_text().splitlines()[:EVAL_PROMPTS]
    held_out.write_text("\n".join(lines) + "\n")
    out = run_ranks(_train, 1, str(tmp / "run"), str(tmp / "lm"), str(held_out), timeout=240)[0]
    return {"tmp": tmp, "init": init, "held_out": held_out, **out}


def test_only_adapters_and_the_head_train(run):
    w, init = run["weights"], run["init"]
    assert run["trainable"] == sorted(n for n in w if ".lora." in n or n.startswith("head."))
    frozen = [n for n in w if ".lora." not in n and not n.startswith("head.")]
    assert frozen and all(torch.equal(w[n], init[n]) for n in frozen)
    assert not torch.equal(w["head.weight"], run["fresh_head"])
    assert all(w[n].abs().sum() > 0 for n in w if n.endswith(".lora.b"))
    ckpt = atomic.find_latest(run["tmp"] / "run" / "checkpoints")
    with safe_open(ckpt / "model" / "tp00_pp00.safetensors", "pt") as f:
        stored = sorted(f.keys())
    assert stored == run["trainable"]


def _held_out_loss(model) -> float:
    from megarlhf.data.rankings import load_ranking_dataset
    from megarlhf.data.tokenizer import load_tokenizer

    tok = load_tokenizer(ROOT / "data" / "tokenizer")
    ds = load_ranking_dataset([str(ROOT / "data" / "rm_tiny_eval.jsonl")], tok, 128)
    samples = ds.samples[:EVAL_PROMPTS]
    seqs = [c for s in samples for c in s.completions]
    ranks = [r for s in samples for r in s.ranks]
    rewards = last_token_rewards(model, seqs)
    return float(pairwise_loss(rewards, ranks, [len(s.completions) for s in samples]))


def test_the_merged_checkpoint_is_the_trained_reward_model(run):
    from megarlhf.config import load_config
    from megarlhf.config.rm import RMRunConfig
    from megarlhf.model.gpt import GPTModel
    from megarlhf.model.lora import base_config
    from megarlhf.parallel.state import single_process_state

    cfg = base_config(load_config(RMRunConfig, RM_TINY, RUN).model)
    model = GPTModel(cfg, single_process_state(), seed=0)
    model.load_state_dict(final_weights(run["tmp"] / "run"), strict=True)
    model.eval()
    last = metrics(run["tmp"] / "run")[-1]
    assert last["eval_prompts"] == EVAL_PROMPTS
    assert _held_out_loss(model) == pytest.approx(last["eval_loss"], rel=1e-5)
    assert abs(last["demo_reward_mean"]) > 1e-3  # there was an offset to remove
    assert demo_reward_mean(model) == pytest.approx(0.0, abs=1e-4)
