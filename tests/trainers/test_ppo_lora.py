"""PPO with LoRA (model.lora.rank > 0) on actor and critic (configs/ppo_tiny.yaml, one rank).

The actor starts from a language-model checkpoint, the critic from the seeded initialization,
and a rule reward replaces the reward model. Checked against independent references:
- the reference log-probs of every step equal (bitwise) those of a separately built model without
  adapters loaded from the same checkpoint, and step 1's KL is exactly 0 (B = 0: the actor starts
  as its base);
- only adapters (and the critic's scalar head) move: after training, every frozen actor tensor is
  the checkpoint's, every frozen critic tensor the seeded initialization of a model built apart;
- no reference copy exists: the reference is the actor's own module with its adapters off, and the
  only models alive are the actor and the critic (a full-weight run would hold a third);
- resume is exact: 2 steps straight equal 1 step, a stop, and 1 resumed step (metrics and final
  weights, bitwise), the frozen bases reloaded from what the checkpoints record.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch

from tests.dist import run_ranks
from tests.trainers.common import EXT_DIR, ROOT, assert_bitwise_equal, final_weights, metrics
from tests.trainers.ppo_common import PPO_TINY, SMALL, Stop
from tests.trainers.rm_common import save_lm_checkpoint

STEPS = 2
LORA = ["model.lora.rank=4", "model.lora.alpha=8", "optim.lr=5e-3", "critic_optim.lr=5e-3"]
RUN = LORA + [f"ppo.max_steps={STEPS}", "checkpoint.save_every=1", "checkpoint.keep_last=0"]


def _worker(rank, world, out_dir, init, stop_after):
    os.environ["LOCAL_RANK"] = str(rank)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", EXT_DIR)
    os.chdir(ROOT)
    from megarlhf.checkpoint.init_from import load_init_weights
    from megarlhf.config import load_config
    from megarlhf.config.ppo import PPORunConfig
    from megarlhf.engine.offload import FrozenModel
    from megarlhf.model.gpt import GPTModel
    from megarlhf.model.lora import AdaptersOffReference, base_config
    from megarlhf.parallel.state import build_parallel_state
    from megarlhf.trainers.loop import TrainerHooks
    from megarlhf.trainers.ppo import PPOTrainer
    from tests.trainers.ppo_toy import target_fraction

    cfg = load_config(PPORunConfig, PPO_TINY, SMALL + RUN + [f"checkpoint.init_from={init}"])
    ps = build_parallel_state(cfg.parallel.tp, cfg.parallel.pp)
    seen: dict = {"refs": []}

    class Probe(PPOTrainer):
        def build(self):
            super().build()
            gc.collect()
            models = [o for o in gc.get_objects() if isinstance(o, GPTModel)]
            seen["models"] = sorted(m.cfg.head for m in models)
            seen["reference_is_actor"] = (
                isinstance(self.reference, AdaptersOffReference)
                and self.reference.model is self.actor.module
            )
            # Independent: a model without adapters, built apart, from the same checkpoint.
            base = GPTModel(base_config(cfg.model), ps, seed=cfg.ppo.loop.seed)
            load_init_weights(base, init, ps)
            independent = FrozenModel(base, self.actor.device)
            maker, compute = self.maker, self.maker.compute_ref_log_prob

            def compute_both(exp):
                got = compute(exp)
                maker.reference = independent
                want = compute(exp)
                maker.reference = self.reference
                seen["refs"].append((got, want))
                return got

            maker.compute_ref_log_prob = compute_both

    def on_step_end(step, rec):
        seen.setdefault("metrics", []).append(rec)
        if step == stop_after:
            raise Stop

    trainer = Probe(cfg, ps, out_dir, TrainerHooks(on_step_end=on_step_end), target_fraction)
    try:
        trainer.train()
    except Stop:
        pass
    seen["actor"] = {n: p.detach().clone() for n, p in trainer.actor.module.named_parameters()}
    seen["critic"] = {n: p.detach().clone() for n, p in trainer.critic.module.named_parameters()}
    critic_init = GPTModel(base_config(cfg.critic_model()), ps, seed=cfg.ppo.loop.seed + 1)
    seen["critic_init"] = {n: p.detach().clone() for n, p in critic_init.named_parameters()}
    return seen


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from megarlhf.config import load_config
    from megarlhf.config.ppo import PPORunConfig

    tmp = tmp_path_factory.mktemp("ppo_lora")
    init = tmp / "sft"
    weights = save_lm_checkpoint(init, load_config(PPORunConfig, PPO_TINY).model, seed=3)
    straight = run_ranks(_worker, 1, str(tmp / "straight"), str(init), 0, timeout=200)[0]
    split = run_ranks(_worker, 1, str(tmp / "split"), str(init), 1, timeout=200)[0]
    resumed = run_ranks(_worker, 1, str(tmp / "split"), str(init), 0, timeout=200)[0]
    return {"tmp": tmp, "init": weights, "straight": straight, "split": split,
            "resumed": resumed}  # fmt: skip


def test_reference_is_the_base_and_step_1_kl_is_zero(runs):
    run = runs["straight"]
    assert len(run["refs"]) == STEPS
    for got, want in run["refs"]:
        assert got.abs().sum() > 0  # real log-probs, not a zero fill
        assert torch.equal(got, want)
    recs = run["metrics"]
    assert recs[0]["kl"] == 0.0
    assert recs[1]["kl"] != 0.0  # the adapters moved the policy away from its base


def test_only_adapters_and_the_critic_head_train(runs):
    run, init = runs["straight"], runs["init"]
    actor, critic = run["actor"], run["critic"]
    adapters = [n for n in actor if ".lora." in n]
    assert len(adapters) == 2 * 4 * 2  # 2 layers x (qkv, proj, fc1, fc2) x (A, B)
    for n, w in actor.items():
        if ".lora." not in n:
            assert torch.equal(w, init[n]), n
    assert all(actor[n].abs().sum() > 0 for n in adapters if n.endswith(".b"))  # B left 0
    for n, w in critic.items():
        if ".lora." not in n and not n.startswith("head."):
            assert torch.equal(w, run["critic_init"][n]), n
    assert not torch.equal(critic["head.weight"], run["critic_init"]["head.weight"])
    assert all(critic[n].abs().sum() > 0 for n in critic if n.endswith(".lora.b"))


def test_no_reference_copy(runs):
    run = runs["straight"]
    assert run["reference_is_actor"]
    assert run["models"] == ["lm", "scalar"]  # actor and critic; no reference model


def test_resume_is_exact(runs):
    a, b = runs["straight"]["metrics"], runs["split"]["metrics"] + runs["resumed"]["metrics"]
    assert len(runs["split"]["metrics"]) == 1 and len(b) == STEPS
    for ra, rb in zip(a, b, strict=True):
        for k in ra:
            if not (k.startswith("time_") or k in ("tokens_per_s", "step_time_s")):
                assert ra[k] == rb[k], (k, ra[k], rb[k])
    tmp = runs["tmp"]
    assert [r["step"] for r in metrics(tmp / "split")] == [1, 2]
    assert_bitwise_equal(runs["straight"]["actor"], runs["resumed"]["actor"])
    assert_bitwise_equal(runs["straight"]["critic"], runs["resumed"]["critic"])
    # The checkpoints' merged views (base read from the recorded sources) agree as well.
    assert_bitwise_equal(final_weights(tmp / "straight"), final_weights(tmp / "split"))
