"""The reward-model step is layout-independent.

One spawned 4-rank gloo world checks, against single-process references:

* one RM step (forward-backward schedule + `make_rm_loss_fn`, mixed K = 2, 5, 3, 9 over two
  micro-batches) at TP=2, PP=2 and TP2 x PP2: each completion's reward and every parameter's
  gradient equal TP=1 (fp32, relative error <= 1e-5), and the loss equals an independent
  pair-by-pair computation; both model families;
* `checkpoint.init_from` of a language-model checkpoint re-sharded onto each layout loads the
  trunk, drops `output.weight` and leaves the head at its fresh initialization;
* bias normalization at TP2 x PP2 subtracts the single-process demonstration mean on every rank
  holding the head;
* `RMTrainer` (DeepSpeed) at TP2 x PP2 (ZeRO-1, 4 micro-batches through 1F1B) and TP=2 x DP=2
  (ZeRO-3) trains exactly like TP=1 x DP=4 (ZeRO-2) for the same global batch of prompts: same
  loss, accuracy, rewards, gradient norm, held-out metrics, normalization and final weights; the
  optimizer's fp32 master copy of the normalized bias equals the model's.
"""

from __future__ import annotations

import os

import pytest
import torch

from megarlhf.data.rankings import RankingSample, collate_rankings
from tests.dist import run_ranks
from tests.model.common import gather_full, reference_model, rel_err, tiny_config
from tests.trainers.common import EXT_DIR, QUIET, ROOT, final_weights, metrics
from tests.trainers.rm_common import RM_TINY, demo_reward_mean, pairwise_loss, save_lm_checkpoint

GROUPS = [[2, 5], [3, 9]]  # K of each prompt, per micro-batch
LAYOUTS = [(2, 1), (1, 2), (2, 2)]
# The ranking loss depends on reward differences only, so it has no gradient with respect to the
# head's bias, nor (gpt2) to the final LayerNorm's bias, which only adds head.weight . bias to every
# reward.
ZERO_GRAD = ("head.bias", "final_norm.bias")  # (tp, pp) on 4 ranks: DP 2, 2, 1
# The init_from / normalization model: the shipped tokenizer's vocabulary, demonstrations' length.
RM_SHAPE = dict(head="scalar", vocab_size=512, max_seq_len=128)
RUN = QUIET + [
    "rm.max_steps=2",
    "rm.micro_batch_size=2",
    "rm.global_batch_size=8",
    "rm.eval_every=0",
    "checkpoint.keep_last=1",
    "optim.warmup_steps=1",
    # See test_sft_parallel: keeps rounding-noise gradients from moving weights by ~lr.
    "optim.eps=1e-6",
]
TRAIN_RUNS = {
    "dp4_z2": ["deepspeed.zero_stage=2"],
    "tp2_pp2_z1": ["deepspeed.zero_stage=1", "parallel.tp=2", "parallel.pp=2"],
    "tp2_dp2_z3": ["deepspeed.zero_stage=3", "parallel.tp=2"],
}


def _micro_batches(vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(3)
    out = []
    for sizes in GROUPS:
        samples = []
        for k in sizes:
            comps = tuple(
                tuple(torch.randint(3, vocab, (int(torch.randint(4, 20, (1,), generator=g)),),
                                    generator=g).tolist())
                for _ in range(k)
            )  # fmt: skip
            ranks = tuple((torch.randperm(k, generator=g) + 1).tolist())
            samples.append(RankingSample(comps, ranks, "test"))
        out.append(collate_rankings(samples, pad_id=0))
    return out


def _reference(cfg, mbs):
    model = reference_model(cfg, seed=7)
    rewards = []
    for mb in mbs:
        scores = model(mb["input_ids"], attention_mask=mb["attention_mask"])[..., 0]
        last = mb["attention_mask"].sum(1) - 1  # right padding
        rewards.append(scores[torch.arange(len(last)), last])
    rewards = torch.cat(rewards)
    ranks = torch.cat([mb["ranks"] for mb in mbs]).tolist()
    loss = pairwise_loss(rewards, ranks, [k for mb in mbs for k in mb["group_sizes"].tolist()])
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return rewards.detach(), loss.detach(), grads


def _step_errors(cfg, ps, mbs, ref):
    from megarlhf.model.gpt import GPTModel
    from megarlhf.parallel.pipeline import get_forward_backward_func
    from megarlhf.trainers.rm import make_rm_loss_fn

    ref_rewards, ref_loss, ref_grads = ref
    model = GPTModel(cfg, ps, seed=7)
    prompts = sum(len(mb["group_sizes"]) for mb in mbs)
    stats = get_forward_backward_func(ps)(
        model=model, micro_batches=mbs, loss_fn=make_rm_loss_fn(prompts), ps=ps
    )
    errs = {}
    if ps.is_last_stage:
        errs["rewards"] = rel_err(torch.cat([s["rewards"] for s in stats]), ref_rewards)
        loss = sum(s["loss_sum"] for s in stats) / prompts
        errs["loss"] = abs(loss - ref_loss.item()) / abs(ref_loss.item())
    scale = max(g.abs().max().item() for g in ref_grads.values())
    for name, p in model.named_parameters():
        spec = model.plan[name]
        grad = p.grad if spec is None else gather_full(p.grad, ps.tp_group, spec)
        if name in ZERO_GRAD:
            # Exactly zero in exact arithmetic: both must be rounding noise of the gradient scale.
            errs[name] = max(grad.abs().max().item(), ref_grads[name].abs().max().item()) / scale
        else:
            errs[name] = rel_err(grad, ref_grads[name])
    return errs


def _init_from_errors(cfg, ps, lm_dir, lm_weights):
    """Trunk from the LM checkpoint, head fresh (seed 11), output.weight dropped."""
    from megarlhf.checkpoint.init_from import load_init_weights
    from megarlhf.model.gpt import GPTModel, init_full_parameter

    model = GPTModel(cfg, ps, seed=11)
    info = load_init_weights(model, lm_dir, ps)
    bad = []
    for name, p in model.named_parameters():
        spec = model.plan[name]
        full = p.detach() if spec is None else gather_full(p.detach(), ps.tp_group, spec)
        if name.startswith("head."):
            want = init_full_parameter(name, full.shape, cfg, 11)
        else:
            want = lm_weights[name]  # vocab 512: no padding at TP 1 or 2
        if not torch.equal(full, want):
            bad.append(name)
    if ps.is_last_stage and not ps.is_first_stage:
        # The last stage of a tied LM holds an output.weight copy: it must have been dropped.
        assert info["dropped"] == ["output.weight"], info
    return bad, info["fresh"]


def _normalization(cfg, ps, demo, want_mean):
    from megarlhf.model.gpt import GPTModel
    from megarlhf.trainers.rm import demonstration_reward_mean, normalize_reward_bias

    model = GPTModel(cfg, ps, seed=7)
    mean = normalize_reward_bias(model, demo, ps)
    after = demonstration_reward_mean(model, demo, ps)
    bias = model.head.bias.detach().clone() if ps.is_last_stage else None
    return {"mean_err": abs(mean - want_mean), "after": after, "bias": bias}


def _train(name, overrides, root):
    from megarlhf.config import load_config
    from megarlhf.config.rm import RMRunConfig
    from megarlhf.parallel.state import build_parallel_state
    from megarlhf.trainers.rm import RMTrainer

    cfg = load_config(RMRunConfig, RM_TINY, RUN + overrides)
    ps = build_parallel_state(cfg.parallel.tp, cfg.parallel.pp)
    trainer = RMTrainer(cfg, ps, os.path.join(root, name))
    trainer.train()
    stage = trainer.model.module
    if not stage.post_process:
        return None
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    bias = stage.head.bias
    master = safe_get_full_fp32_param(bias)
    if hasattr(bias, "ds_id"):
        with deepspeed.zero.GatheredParameters([bias]):
            module = bias.detach().clone()
    else:
        module = bias.detach().clone()
    return {"module": module, "master": None if master is None else master.clone()}


def _world(rank, world, lm_dir, lm_weights, demo_mean, root):
    os.environ["LOCAL_RANK"] = str(rank)
    os.chdir(ROOT)
    from megarlhf.parallel.state import build_parallel_state
    from megarlhf.trainers.rm import demonstration_batches

    out = {"step": {}, "init_from": {}}
    for family in ("gpt2", "llama"):
        cfg = tiny_config(family, head="scalar")
        mbs = _micro_batches(cfg.vocab_size)
        ref = _reference(cfg, mbs)
        for tp, pp in LAYOUTS:
            ps = build_parallel_state(tp, pp)
            out["step"][(family, tp, pp)] = _step_errors(cfg, ps, mbs, ref)
    cfg = tiny_config("gpt2", **RM_SHAPE)
    for tp, pp in LAYOUTS:
        out["init_from"][(tp, pp)] = _init_from_errors(
            cfg, build_parallel_state(tp, pp), lm_dir, lm_weights
        )
    ps = build_parallel_state(2, 2)
    demo = _demo_batches(ps, demonstration_batches)
    out["norm"] = _normalization(cfg, ps, demo, demo_mean)
    out["train"] = {name: _train(name, o, root) for name, o in TRAIN_RUNS.items()}
    return out


def _demo_batches(ps, demonstration_batches):
    from megarlhf.data.tokenizer import load_tokenizer

    tok = load_tokenizer(ROOT / "data" / "tokenizer")
    return demonstration_batches([str(ROOT / "data/sft_tiny.jsonl")], tok, 128, "auto", 16, ps)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", EXT_DIR)
    tmp = tmp_path_factory.mktemp("rm_parallel")
    lm_weights = save_lm_checkpoint(
        tmp / "lm", tiny_config("gpt2", **{**RM_SHAPE, "head": "lm"}), 5
    )
    demo_mean = demo_reward_mean(reference_model(tiny_config("gpt2", **RM_SHAPE), seed=7))
    results = run_ranks(
        _world, 4, str(tmp / "lm"), lm_weights, demo_mean, str(tmp / "runs"), timeout=420
    )
    return {"results": results, "runs": tmp / "runs"}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_rm_step_rewards_and_gradients_equal_tp1(world, family, tp, pp):
    seen = set()
    for rank, res in enumerate(world["results"]):
        errs = res["step"][(family, tp, pp)]
        bad = {k: v for k, v in errs.items() if not v <= 1e-5}
        assert not bad, (rank, bad)
        seen |= set(errs)
    # Every parameter of the model was compared on some rank, and the last stage's rewards.
    assert {"rewards", "loss", "head.weight", "head.bias", "embedding.word.weight"} <= seen


@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_init_from_lm_checkpoint_loads_trunk_and_keeps_fresh_head(world, tp, pp):
    fresh = set()
    for rank, res in enumerate(world["results"]):
        bad, fresh_here = res["init_from"][(tp, pp)]
        assert not bad, (rank, bad)
        fresh |= set(fresh_here)
    assert fresh == {"head.weight", "head.bias"}


def test_normalization_is_consistent_across_ranks(world):
    biases = []
    for res in world["results"]:
        n = res["norm"]
        assert n["mean_err"] < 1e-5 and abs(n["after"]) < 1e-5, n
        if n["bias"] is not None:
            biases.append(n["bias"])
    assert len(biases) == 2  # the two TP ranks of the last stage
    assert torch.equal(biases[0], biases[1]) and biases[0].abs().item() > 1e-3


def _close(a, b, rtol=1e-5):
    assert a == pytest.approx(b, rel=rtol, abs=1e-7)


@pytest.mark.parametrize("name", ["tp2_pp2_z1", "tp2_dp2_z3"])
def test_trainer_layouts_equal_dp4(world, name):
    ref, run = metrics(world["runs"] / "dp4_z2"), metrics(world["runs"] / name)
    assert [r["step"] for r in run] == [1, 2]
    keys = ("loss", "accuracy", "margin", "reward_mean", "reward_std", "grad_norm", "lr")
    for a, b in zip(run, ref, strict=True):
        assert a["prompts"] == b["prompts"] == 8 and a["pairs"] == b["pairs"]
        for k in keys:
            _close(a[k], b[k])
    last, want = run[-1], ref[-1]
    assert last["eval_prompts"] == want["eval_prompts"] == 64
    for k in ("eval_loss", "eval_accuracy", "demo_reward_mean", "reward_offset"):
        _close(last[k], want[k])
    got, exp = final_weights(world["runs"] / name), final_weights(world["runs"] / "dp4_z2")
    assert got.keys() == exp.keys()
    for k, w in exp.items():
        torch.testing.assert_close(got[k], w, rtol=1e-4, atol=5e-6, msg=k)


def test_normalized_bias_is_in_the_optimizer_master_copy(world):
    for res in world["results"]:
        for name, b in res["train"].items():
            if b is None:
                continue  # not the last stage
            assert b["master"] is not None, name  # ZeRO 1/2/3 keep an fp32 master copy
            torch.testing.assert_close(b["master"], b["module"], rtol=0, atol=0, msg=name)
