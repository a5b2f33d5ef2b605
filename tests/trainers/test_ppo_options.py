"""The PPO options where the wiring matters, against hand-computed values and loop references.

- The experience maker's stages without models (dummy roles, one process): score penalties
  (missing EOS, overlong) enter the score before whitening, clipping and the KL reward, with
  their metrics; REINFORCE++ advantages are whitened whatever ppo.whiten_advantages says, and
  REINFORCE++-baseline's groups may span DP ranks (DP=2 equals the whole batch); the truncated
  importance weights and their metrics.
- One actor optimizer step per loss aggregation mode (and with dual-clip, and with the rollout
  importance-sampling correction plus the entropy bonus): the gradient the trainer's packed
  micro-batches accumulate equals an fp64 per-sequence, per-token loop over the same weights.
- Critic warm-up: the actor, its EMA, the PTX stream and the KL controller stay put while the
  critic trains, and a run stopped inside the warm-up resumes across its end exactly.
- A run with every option on logs each option's metric, equal to what the responses say.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from megarlhf.algos.kl_controller import KLController
from megarlhf.algos.ppo import LOSS_AGGREGATIONS
from megarlhf.algos.stats import masked_whiten
from megarlhf.config import ConfigError, load_config
from megarlhf.config.ppo import PPOAlgoConfig, PPORunConfig
from megarlhf.engine.experience import ExperienceMaker, MicroBatching, collate_samples
from megarlhf.engine.hybrid import Sample
from megarlhf.parallel.state import ParallelState, build_parallel_state, single_process_state
from tests.dist import run_ranks
from tests.trainers.common import EXT_DIR, ROOT, assert_bitwise_equal, metrics
from tests.trainers.ppo_common import PPO_TINY, SMALL, run_ppo

EOS = 2
BETA = 0.1

# ----------------------------------------------------------------------------- maker stages


def _maker(algo: PPOAlgoConfig, group_size: int = 1, ps: ParallelState | None = None):
    """An ExperienceMaker whose model stages are never called."""
    return ExperienceMaker(
        actor=None, reference=None, critic=None, scorer=None, kl_ctl=KLController(BETA),
        algo=algo, ps=ps or single_process_state(), fwd_bwd=None, batching=MicroBatching(),
        temperature=1.0, group_size=group_size, eos_id=EOS,
    )  # fmt: skip


def _experience(responses, scores, n=4):
    """Collated samples with old = generation log-probs, k1 KL 0.1 per token, zero values."""
    samples = [Sample([5, 6], r, [-1.0 - 0.1 * j for j in range(len(r))]) for r in responses]
    exp = collate_samples(samples, 2, n, pad_id=0)
    exp.old_logprobs = exp.gen_logprobs.clone()
    exp.ref_logprobs = exp.gen_logprobs - 0.1 * exp.mask
    exp.values = torch.zeros_like(exp.mask)
    exp.scores = torch.tensor(scores)
    return exp


# EOS-ended lengths 3 and 2; rows 1 and 2 hold no EOS (lengths 4 = max_new_tokens, and 1).
RESPONSES = [[10, 11, EOS], [10, 11, 12, 13], [10], [10, EOS]]
SCORES = [1.0, 2.0, 3.0, 4.0]
# missing_eos_penalty 2 on rows 1, 2; overlong L_buf 2, factor 1: 0.5 at 3 tokens, 1 at 4.
SHAPED = torch.tensor([1.0 - 0.5, 2.0 - 2.0 - 1.0, 3.0 - 2.0, 4.0])
PENALTIES = dict(missing_eos_penalty=2.0, overlong_buffer_len=2, overlong_penalty_factor=1.0)


def test_score_penalties_enter_the_score_before_the_kl_reward():
    exp = _experience(RESPONSES, SCORES)
    maker = _maker(PPOAlgoConfig(kl_coef=BETA, **PENALTIES))
    pen = maker.compute_score_penalties(exp)
    assert pen["missing_eos"].tolist() == [0.0, 2.0, 2.0, 0.0]
    assert pen["overlong"].tolist() == [0.5, 1.0, 0.0, 0.0]
    rewards, kl, _ = maker.compute_rewards(exp, pen)
    last = exp.mask.sum(-1).long() - 1
    for i in range(4):
        for t in range(int(exp.mask[i].sum())):
            want = -BETA * 0.1 + (SHAPED[i].item() if t == last[i] else 0.0)
            assert rewards[i, t].item() == pytest.approx(want, abs=1e-6), (i, t)
    assert torch.equal(exp.scores, torch.tensor(SCORES))  # the raw scores stay for the metrics
    stats = maker.option_stats(exp, pen)
    assert stats == {"missing_eos_frac": 0.5, "overlong_penalty_mean": 1.5 / 4}
    # Whitening, then clipping, act on the shaped scores.
    clip = 0.5
    algo = PPOAlgoConfig(kl_coef=BETA, whiten_rewards=True, score_clip=clip, **PENALTIES)
    rewards, _, _ = _maker(algo).compute_rewards(exp, pen)
    white = ((SHAPED - SHAPED.mean()) / (SHAPED.var() + 1e-8).sqrt()).clamp(-clip, clip)
    got = rewards[torch.arange(4), last] + BETA * 0.1
    assert torch.allclose(got, white, atol=1e-6)
    # Off (the defaults): nothing to subtract, no metric.
    assert _maker(PPOAlgoConfig()).compute_score_penalties(exp) == {}
    assert _maker(PPOAlgoConfig()).option_stats(exp, {}) == {}


def test_reinforce_advantages_are_whitened_returns():
    exp = _experience(RESPONSES, SCORES)
    algo = PPOAlgoConfig(
        kl_coef=BETA, advantage_estimator="reinforce", whiten_advantages=False, gamma=0.9
    )
    maker = _maker(algo)
    exp.rewards, _, _ = maker.compute_rewards(exp)
    adv, ret = maker.compute_advantages(exp)
    loop = torch.zeros_like(exp.rewards)
    for i in range(exp.rows):
        g = 0.0
        for t in range(int(exp.mask[i].sum()) - 1, -1, -1):
            g = exp.rewards[i, t].item() + 0.9 * g
            loop[i, t] = g
    assert torch.allclose(ret, loop, atol=1e-6)
    assert torch.allclose(adv, masked_whiten(loop, exp.mask), atol=1e-5)


def _baseline_rows(rank, world):
    """Six responses, K = 2; on two DP ranks the group of rows 2 and 3 spans both."""
    rng = torch.Generator().manual_seed(3)
    responses = [[10 + j for j in range(1 + i % 4)] for i in range(6)]
    exp = _experience(responses, torch.randn(6, generator=rng).tolist())
    algo = PPOAlgoConfig(kl_coef=BETA, advantage_estimator="reinforce_baseline")
    if world == 1:
        ps = single_process_state()
    else:
        ps = build_parallel_state(1, 1)
        exp = exp.select(rank * 3, rank * 3 + 3)
    maker = _maker(algo, group_size=2, ps=ps)
    exp.rewards, _, _ = maker.compute_rewards(exp)
    return maker.compute_advantages(exp)[0], exp.rewards, exp.mask


def test_reinforce_baseline_groups_span_dp_ranks():
    whole, rewards, mask = _baseline_rows(0, 1)
    parts = run_ranks(_baseline_rows, 2, timeout=120)
    assert torch.allclose(torch.cat([p[0] for p in parts]), whole, atol=1e-6)
    # The loop reference: gamma 1, so A_t = G_t - the group's mean sequence reward, whitened.
    seq = [float(rewards[i].sum()) for i in range(6)]
    loop = torch.zeros_like(rewards)
    for i in range(6):
        base = (seq[2 * (i // 2)] + seq[2 * (i // 2) + 1]) / 2
        for t in range(int(mask[i].sum())):
            loop[i, t] = float(rewards[i, t:].sum()) - base
    assert torch.allclose(whole, masked_whiten(loop, mask), atol=1e-5)


def test_is_weights_and_their_metrics():
    exp = _experience(RESPONSES, SCORES)
    offsets = torch.tensor(
        [[0.0, 0.5, 1.0, 0.0], [-1.0, 0.0, 2.0, 0.1], [0.3, 0, 0, 0], [0, 0, 0, 0]]
    )
    exp.old_logprobs = (exp.gen_logprobs + offsets) * exp.mask
    maker = _maker(PPOAlgoConfig(rollout_is="tis", rollout_is_cap=2.0))
    exp.is_weights = maker.compute_is_weights(exp)
    want = offsets.exp().clamp(max=2.0) * exp.mask
    assert torch.allclose(exp.is_weights, want)
    stats = maker.option_stats(exp, {})
    assert stats["is_weight_mean"] == pytest.approx(float(want.sum() / exp.mask.sum()))
    assert stats["is_weight_max"] == pytest.approx(2.0)
    assert _maker(PPOAlgoConfig()).compute_is_weights(exp) is None


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["ppo.rollout_is=tis", "ppo.recompute_old_logprobs=false"], "rollout_is"),
        (["ppo.rollout_is=is"], "rollout_is"),
        (["ppo.rollout_is_cap=0"], "rollout_is_cap"),
        (["ppo.dual_clip_c=0.5"], "dual_clip_c"),
        (
            [
                "ppo.critic_warmup_steps=3",
                "ppo.advantage_estimator=rloo",
                "ppo.samples_per_prompt=2",
            ],
            "critic_warmup_steps",
        ),  # fmt: skip
        (["ppo.critic_warmup_steps=5", "ppo.max_steps=5"], "critic_warmup_steps"),
        (["ppo.overlong_buffer_len=25"], "ppo.overlong_buffer_len"),
        (["ppo.missing_eos_penalty=-1"], "missing_eos_penalty"),
        (["ppo.advantage_estimator=reinforce_baseline"], "samples_per_prompt"),
    ],
)
def test_option_validation(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_config(PPORunConfig, PPO_TINY, overrides)


# ----------------------------------------------------------------------------- actor gradients

GRAD_RUN = SMALL + [
    "deepspeed.zero_stage=0",  # the gradients sit in p.grad before the optimizer step
    "ppo.num_minibatches=1",
    "ppo.ptx_coef=0.0",
    "ppo.max_steps=1",
    "logging.tensorboard=false",
]
# (ppo.loss_agg, ppo.dual_clip_c, ppo.rollout_is, ppo.entropy_coef)
CASES = [(mode, 0.0, "none", 0.0) for mode in LOSS_AGGREGATIONS] + [
    ("token-mean", 2.0, "none", 0.0),
    ("seq-mean-token-mean", 2.0, "tis", 0.05),
]
CAP = 1.5


def _grad_worker(rank, world, out_dir):
    os.environ["LOCAL_RANK"] = str(rank)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", EXT_DIR)
    os.chdir(ROOT)
    from megarlhf.trainers.ppo import PPOTrainer
    from megarlhf.utils.timing import StageTimer

    cfg = load_config(PPORunConfig, PPO_TINY, GRAD_RUN)
    trainer = PPOTrainer(cfg, build_parallel_state(1, 1), out_dir)
    trainer.setup()
    samples, width = trainer.rollout()
    n = cfg.generation.max_new_tokens
    # A random policy rarely stops early; responses of unequal lengths tell the modes apart.
    cut = [dataclasses.replace(s, response=s.response[:k], logprobs=s.logprobs[:k])
           for s, k in zip(samples, (1, 8, 3, 5, 6, 2, 7, 4), strict=True)]  # fmt: skip
    assert len({len(s.response) for s in cut}) == 8
    samples = cut
    exp, _ = trainer.maker.make(samples, width, n, trainer.tokenizer.pad_id, StageTimer())
    g = torch.Generator().manual_seed(0)
    noise = lambda: 0.7 * torch.randn(exp.mask.shape, generator=g)  # noqa: E731
    # Ratios away from 1 (both clips bite), signed advantages, generation log-probs off the
    # training ones (weights both sides of 1 and above the cap).
    exp.old_logprobs = (exp.old_logprobs + noise()) * exp.mask
    exp.advantages = torch.randn(exp.mask.shape, generator=g) * exp.mask
    exp.gen_logprobs = (exp.old_logprobs + noise()) * exp.mask
    module = trainer.actor.module
    init = {k: p.detach().clone() for k, p in module.named_parameters()}
    captured = []
    step = trainer.actor.step

    def recording_step():
        captured.append({k: p.grad.detach().clone() for k, p in module.named_parameters()})
        return step()

    trainer.actor.step = recording_step
    base, recs = trainer.algo, []
    for agg, c, tis, ent in CASES:
        algo = dataclasses.replace(base, loss_agg=agg, dual_clip_c=c, rollout_is=tis,
                                   rollout_is_cap=CAP, entropy_coef=ent)  # fmt: skip
        trainer.algo = trainer.maker.algo = algo
        exp.is_weights = trainer.maker.compute_is_weights(exp)
        with torch.no_grad():
            for k, p in module.named_parameters():
                p.copy_(init[k])
        recs.append(trainer.update_actor(exp))
    data = {k: getattr(exp, k) for k in ("prompt_width", "input_ids", "attention_mask",
                                         "responses", "mask", "old_logprobs", "advantages",
                                         "gen_logprobs")}  # fmt: skip
    return init, captured, recs, data


def _reference_grads(model, d, agg, c, tis, ent):
    """fp64 gradient of the step's loss: one sequence at a time, one token at a time."""
    model.zero_grad()
    p, rows, width = d["prompt_width"], d["mask"].shape[0], d["mask"].shape[1]
    vocab = model.cfg.vocab_size
    row_sums, row_lens = [], []
    for i in range(rows):
        prompt = d["input_ids"][i, :p][d["attention_mask"][i, :p].bool()]
        n = int(d["mask"][i].sum())
        resp = d["responses"][i, :n]
        seq = torch.cat([prompt, resp])[None]
        logits = model(seq, position_ids=torch.arange(seq.shape[1])[None])[0, :, :vocab]
        total = torch.zeros((), dtype=torch.float64)
        for t in range(n):
            lp = torch.log_softmax(logits[len(prompt) - 1 + t].double(), -1)
            old, a = d["old_logprobs"][i, t].double(), d["advantages"][i, t].double()
            ratio = torch.exp(lp[resp[t]] - old)
            loss = torch.maximum(-a * ratio, -a * ratio.clamp(0.8, 1.2))
            if c and a < 0:
                loss = torch.minimum(loss, -c * a)
            if tis == "tis":
                loss = loss * min(float(torch.exp(old - d["gen_logprobs"][i, t].double())), CAP)
            if ent:
                loss = loss - ent * -(lp.exp() * lp).sum()
            total = total + loss
        row_sums.append(total)
        row_lens.append(n)
    if agg == "token-mean":
        step_loss = sum(row_sums) / sum(row_lens)
    elif agg == "seq-mean-token-sum":
        step_loss = sum(row_sums) / rows
    elif agg == "seq-mean-token-mean":
        step_loss = sum(s / max(k, 1) for s, k in zip(row_sums, row_lens, strict=True)) / rows
    else:  # seq-mean-token-sum-norm
        step_loss = sum(row_sums) / (rows * width)
    step_loss.backward()
    return {k: q.grad.detach().clone() for k, q in model.named_parameters()}


@pytest.mark.timeout(300)
def test_actor_step_gradient_equals_fp64_loop(tmp_path):
    from megarlhf.model.gpt import GPTModel

    init, captured, recs, d = run_ranks(_grad_worker, 1, str(tmp_path), timeout=240)[0]
    assert len(captured) == len(CASES)  # one optimizer step per case
    cfg = load_config(PPORunConfig, PPO_TINY, GRAD_RUN)
    model = GPTModel(cfg.model, single_process_state(), seed=0)
    with torch.no_grad():
        for k, q in model.named_parameters():
            q.copy_(init[k])
    model.double()
    assert recs[-2]["dual_clipfrac"] > 0  # the bound was taken somewhere
    norms = []
    for case, got in zip(CASES, captured, strict=True):
        want = _reference_grads(model, d, *case)
        assert got.keys() == want.keys()
        for k in want:
            err = (got[k].double() - want[k]).norm() / want[k].norm().clamp_min(1e-12)
            assert err < 1e-4, (case, k, float(err))
        norms.append(float(sum(w.norm() ** 2 for w in want.values()) ** 0.5))
    assert len(set(round(x, 6) for x in norms)) == len(CASES)  # every case is its own loss


# ----------------------------------------------------------------------------- critic warm-up

WARMUP = [
    "ppo.max_steps=3",
    "ppo.critic_warmup_steps=2",
    "checkpoint.save_every=1",
    "checkpoint.keep_last=0",
    "ppo.kl_target=0.5",
    "ppo.kl_horizon=100",
    "ppo.ptx_coef=1.0",
    "ppo.ema_decay=0.9",
    "logging.tensorboard=false",
]


def _warmup_worker(rank, world, out_dir, stop_after):
    return run_ppo(rank, WARMUP, out_dir, stop_after=stop_after)["metrics"]


def _ckpt(out, step, sub=""):
    from megarlhf.checkpoint.model_shards import ModelShardsReader

    path = out / "checkpoints" / f"step_{step:06d}"
    with ModelShardsReader(path / sub if sub else path) as r:
        weights = {n: r.full_tensor(n) for n in r.names()}
    state = torch.load(path / "trainer" / "rank_00000.pt", weights_only=False)
    return weights, state


@pytest.mark.timeout(400)
def test_critic_warmup_freezes_the_actor_and_resumes_exactly(tmp_path):
    straight = tmp_path / "straight"
    run_ranks(_warmup_worker, 1, str(straight), 0, timeout=200)
    recs = metrics(straight)
    assert [r["actor_frozen"] for r in recs] == [1.0, 1.0, 0.0]
    for r in recs[:2]:
        assert r["policy_loss"] == r["grad_norm"] == r["ptx_loss"] == 0.0
        assert r["value_loss"] > 0
    assert recs[2]["grad_norm"] > 0 and recs[2]["ptx_loss"] > 0
    # beta: held over the warm-up (the step-3 record shows the beta it used), then moved.
    assert recs[0]["kl_coef"] == recs[1]["kl_coef"] == recs[2]["kl_coef"] == 0.02
    a1, s1 = _ckpt(straight, 1)
    a2, s2 = _ckpt(straight, 2)
    a3, s3 = _ckpt(straight, 3)
    assert_bitwise_equal(a1, a2)  # the actor did not move
    assert any(not torch.equal(a2[n], a3[n]) for n in a2)
    assert_bitwise_equal(_ckpt(straight, 2, "ema")[0], a2)  # no EMA fold
    c1, c2 = _ckpt(straight, 1, "critic")[0], _ckpt(straight, 2, "critic")[0]
    assert any(not torch.equal(c1[n], c2[n]) for n in c1)  # the critic trained
    assert s2["ptx_sampler"]["position"] == 0 and s3["ptx_sampler"]["position"] > 0
    assert s2["sampler"]["position"] == 2 * 8  # the prompts were drawn
    assert s1["kl_ctl"]["beta"] == s2["kl_ctl"]["beta"] == 0.02 != s3["kl_ctl"]["beta"]
    # Stopped inside the warm-up, resumed across its end: the same run.
    split = tmp_path / "split"
    run_ranks(_warmup_worker, 1, str(split), 1, timeout=200)
    run_ranks(_warmup_worker, 1, str(split), 0, timeout=200)
    for ra, rb in zip(recs, metrics(split), strict=True):
        for k in ra:
            if not (k.startswith("time_") or k in ("tokens_per_s", "step_time_s")):
                assert ra[k] == rb[k], (ra["step"], k)
    for sub in ("", "critic", "ema"):
        assert_bitwise_equal(_ckpt(straight, 3, sub)[0], _ckpt(split, 3, sub)[0])
    assert _ckpt(split, 3)[1]["ptx_sampler"] == s3["ptx_sampler"]


# ----------------------------------------------------------------------------- all options on

SEEN: list[list[int]] = []


def _recording_reward(prompts, responses):
    SEEN.extend(list(r) for r in responses)
    return [sum(t % 7 == 0 for t in r) / max(len(r), 1) for r in responses]


ALL_ON = [
    "ppo.max_steps=1",
    "ppo.advantage_estimator=reinforce_baseline",
    "ppo.samples_per_prompt=2",
    "ppo.rollout_batch_size=4",
    "ppo.dual_clip_c=3.0",
    "ppo.rollout_is=tis",
    "ppo.rollout_is_cap=2.0",
    "ppo.missing_eos_penalty=1.0",
    "ppo.overlong_buffer_len=4",
    "ppo.overlong_penalty_factor=0.5",
    "ppo.ptx_coef=0.0",
    "logging.tensorboard=false",
]


def _all_on_worker(rank, world, out_dir):
    out = run_ppo(rank, ALL_ON, out_dir, reward_fn=_recording_reward)
    from megarlhf.data.tokenizer import load_tokenizer

    eos = load_tokenizer(ROOT / "data" / "tokenizer").eos_id
    return out["metrics"], list(SEEN), eos


@pytest.mark.timeout(300)
def test_every_option_logs_its_metric(tmp_path):
    recs, seen, eos = run_ranks(_all_on_worker, 1, str(tmp_path), timeout=240)[0]
    n = 8  # generation.max_new_tokens in SMALL
    assert len(seen) == len(recs) * 8
    for step, rec in enumerate(recs):
        batch = seen[step * 8 : (step + 1) * 8]
        missing = sum(eos not in r for r in batch) / 8
        overlong = sum(0.5 * min(max((len(r) - (n - 4)) / 4, 0.0), 1.0) for r in batch) / 8
        assert rec["missing_eos_frac"] == pytest.approx(missing)
        assert rec["overlong_penalty_mean"] == pytest.approx(overlong)
        # fp32 generation and training log-probs agree to ~1e-6: the weights are ~1.
        assert rec["is_weight_mean"] == pytest.approx(1.0, abs=1e-4)
        assert rec["is_weight_max"] == pytest.approx(1.0, abs=1e-4)
        assert 0.0 <= rec["dual_clipfrac"] <= 1.0
        assert rec["value_loss"] == 0.0  # REINFORCE++ builds no critic
