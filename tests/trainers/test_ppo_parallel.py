"""One PPO run is layout-independent, and generation log-probs equal the training recomputation.

Two PPO steps (rollout with seeded temperature-1 sampling, RM scores, k1 KL rewards, GAE,
whitened advantages, two minibatches of clipped PPO + value updates with PTX in the same actor
step) at TP=2, PP=2 (2 ranks) and TP=2 x PP=2 (4 ranks) equal the single-process TP=1 run: the
same rollouts, rewards, losses and statistics, and the same final actor weights (fp32), whether
the experience is packed several sequences per row, padded one per row, or cut by a token budget
into more micro-batches. The
generation layout has DP 1 in both (ppo.generation_tp = world), so both runs draw the same
sampling stream. Every step's `logprob_mismatch` (generation vs training layout, fp32) is
<= 1e-5.
"""

from __future__ import annotations

import pytest

from megarlhf.config import load_config
from megarlhf.config.ppo import PPORunConfig
from megarlhf.model.gpt import GPTModel
from megarlhf.parallel.state import single_process_state
from tests.dist import run_ranks
from tests.trainers.common import final_weights
from tests.trainers.ppo_common import PPO_TINY, run_ppo

STEPS = ["ppo.max_steps=2", "ppo.ptx_coef=1.0"]
COMPARED = (
    "reward_mean",
    "reward_std",
    "kl",
    "non_score_reward",
    "entropy",
    "response_length",
    "policy_loss",
    "value_loss",
    "clipfrac",
    "approx_kl",
    "ptx_loss",
    "explained_variance",
)


def _worker(rank, world, overrides, out_dir):
    return run_ppo(rank, STEPS + overrides, out_dir)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo_tp1")
    return run_ranks(_worker, 1, ["ppo.generation_tp=1"], str(out), timeout=200)[0], out


# tp, pp, world, and how the experience is cut: the reference packs several sequences per row;
# these runs pack too, or run one padded sequence per row, or pack under a small token budget
# (several micro-batches per minibatch), so packed == padded is checked at TP=2 and PP=2.
PADDED = ["ppo.pack_sequences=false"]
LAYOUTS = {
    "tp2": (2, 1, 2, []),
    "tp2_padded": (2, 1, 2, PADDED),
    "pp2_padded": (1, 2, 2, PADDED),
    "tp2pp2_budget": (2, 2, 4, ["ppo.max_tokens_per_micro_batch=40"]),
}


@pytest.mark.timeout(400)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_ppo_steps_equal_tp1(reference, layout, tmp_path):
    ref, ref_dir = reference
    tp, pp, world, cut = LAYOUTS[layout]
    over = [f"parallel.tp={tp}", f"parallel.pp={pp}", f"ppo.generation_tp={world}", *cut]
    par = run_ranks(_worker, world, over, str(tmp_path), timeout=300)
    for res in (ref, *par):
        for rec in res["metrics"]:
            assert rec["logprob_mismatch"] <= 1e-5, rec["logprob_mismatch"]
    for rank, res in enumerate(par):
        for a, b in zip(ref["metrics"], res["metrics"], strict=True):
            for k in COMPARED:
                assert abs(a[k] - b[k]) <= 1e-4 * max(1.0, abs(a[k])), (rank, k, a[k], b[k])
    w_ref, w_par = final_weights(ref_dir), final_weights(tmp_path)
    assert w_ref.keys() == w_par.keys()
    for name in w_ref:
        diff = (w_ref[name] - w_par[name]).abs().max().item()
        assert diff <= 2e-5, (name, diff)
    # The two updates moved the actor away from its initialization (same seed as the run's).
    cfg = load_config(PPORunConfig, PPO_TINY)
    seed = cfg.ppo.loop.seed
    init = dict(GPTModel(cfg.model, single_process_state(), seed=seed).named_parameters())
    moved = max(
        (w_ref[n] - init[n].detach()[: w_ref[n].shape[0]]).abs().max().item() for n in w_ref
    )
    assert moved > 1e-5, moved


def _z3_worker(rank, world, overrides, out_dir):
    """run_ppo with every parameter really partitioned under ZeRO-3 (DeepSpeed keeps parameters
    under 1e5 elements, i.e. all of the tiny model's, whole by default)."""
    from megarlhf.optim import deepspeed_model

    base = deepspeed_model.deepspeed_config

    def partition_all(**kw):
        out = base(**kw)
        out["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        return out

    deepspeed_model.deepspeed_config = partition_all
    from megarlhf.engine import hybrid

    seen = []
    build = hybrid.HybridEngine.build_generation_model

    def checking_build(self):
        ds = [p for p in self.actor.parameters() if hasattr(p, "ds_id")]
        seen.append(bool(ds) and all(p.numel() == 0 for p in ds))  # partitioned away
        return build(self)

    hybrid.HybridEngine.build_generation_model = checking_build
    res = run_ppo(rank, STEPS + overrides, out_dir)
    res["partitioned"] = seen
    return res


@pytest.mark.timeout(400)
def test_zero3_actor_equals_zero1(tmp_path):
    """A ZeRO-3 actor / critic at DP=2, every parameter partitioned (the hybrid engine gathers
    them for the generation copy), trains exactly like ZeRO-1 at DP=2 (fp32)."""
    runs = {}
    for stage, worker in ((1, _worker), (3, _z3_worker)):
        out = tmp_path / f"z{stage}"
        res = run_ranks(worker, 2, [f"deepspeed.zero_stage={stage}"], str(out), timeout=300)
        runs[stage] = (res[0]["metrics"], final_weights(out))
        if stage == 3:
            assert all(r["partitioned"] == [True, True] for r in res), res[0]["partitioned"]
    (m1, w1), (m3, w3) = runs[1], runs[3]
    for a, b in zip(m1, m3, strict=True):
        for k in COMPARED:
            assert abs(a[k] - b[k]) <= 1e-4 * max(1.0, abs(a[k])), (k, a[k], b[k])
    for name in w1:
        assert (w1[name] - w3[name]).abs().max().item() <= 2e-5, name


def test_offloaded_frozen_models_give_the_same_run(reference, tmp_path):
    ref, _ = reference
    (res,) = run_ranks(
        _worker, 1, ["ppo.generation_tp=1", "ppo.offload_frozen=true"], str(tmp_path), timeout=200
    )
    for a, b in zip(ref["metrics"], res["metrics"], strict=True):
        assert all(a[k] == b[k] for k in COMPARED), (a, b)


def test_reward_whitening_changes_the_update_not_the_rollout(tmp_path):
    # Same rollout (metrics report raw scores), different rewards: whitened scores move the actor
    # differently. The moments are global over DP (megarlhf.algos.stats.whiten_with_moments over
    # the DP sums, tested against whole-population whitening in tests/algos).
    runs = {}
    for flag in ("false", "true"):
        over = [f"ppo.whiten_rewards={flag}", "ppo.max_steps=1", "ppo.generation_tp=1"]
        (runs[flag],) = run_ranks(_worker, 1, over, str(tmp_path / flag), timeout=200)
    for k in ("reward_mean", "reward_std", "kl", "response_length"):
        assert runs["false"]["metrics"][0][k] == runs["true"]["metrics"][0][k], k
    w_off, w_on = final_weights(tmp_path / "false"), final_weights(tmp_path / "true")
    assert max((w_off[n] - w_on[n]).abs().max().item() for n in w_off) > 0
