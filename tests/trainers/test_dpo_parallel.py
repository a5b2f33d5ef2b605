"""The DPO trainer is layout-independent.

`DPOTrainer` (DeepSpeed) started from a language-model checkpoint (also the frozen reference)
trains 3 steps of 8 prompts (mixed K, every pair of a prompt in one batch element) plus a
held-out evaluation. One process (TP=1, PP=1, ZeRO-1) is the reference; one spawned 2-rank gloo
world runs TP=2 (ZeRO-1, the reference through the TP layers), PP=2 (ZeRO-2, 1F1B, tied
embeddings, the reference precomputed over the training set before step 1) and DP=2 (ZeRO-3) with
IPO against a single-process IPO run. Each equals its single-process run in every metric (loss,
accuracy, margin, implicit rewards, grad norm, eval_*) and in the final weights, to fp32
precision.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.dist import run_ranks
from tests.trainers.common import EXT_DIR, QUIET, ROOT, final_weights, metrics
from tests.trainers.rm_common import save_lm_checkpoint

DPO_TINY = str(ROOT / "configs" / "dpo_tiny.yaml")
STEPS = 3
EVAL_PROMPTS = 12
RUN = QUIET + [
    f"dpo.max_steps={STEPS}",
    "dpo.micro_batch_size=2",
    "dpo.global_batch_size=8",
    "dpo.eval_every=0",
    "dpo.beta=0.5",
    "checkpoint.keep_last=1",
    "optim.warmup_steps=1",
    # See test_sft_parallel: keeps rounding-noise gradients from moving weights by ~lr.
    "optim.eps=1e-6",
]
IPO = ["dpo.loss=ipo", "dpo.beta=0.5"]
SINGLE = {"single": ["deepspeed.zero_stage=1"], "single_ipo": ["deepspeed.zero_stage=1", *IPO]}
WORLD = {
    "tp2_z1": ("single", ["deepspeed.zero_stage=1", "parallel.tp=2"]),
    "pp2_z2_pre": (
        "single",
        ["deepspeed.zero_stage=2", "parallel.pp=2", "dpo.precompute_reference=true"],
    ),
    "dp2_z3_ipo": ("single_ipo", ["deepspeed.zero_stage=3", *IPO]),
}
KEYS = ("loss", "accuracy", "margin", "chosen_reward", "rejected_reward", "grad_norm", "lr")


def _train(name, overrides, root, init, held_out):
    from megarlhf.config import load_config
    from megarlhf.config.dpo import DPORunConfig
    from megarlhf.parallel.state import build_parallel_state
    from megarlhf.trainers.dpo import DPOTrainer

    cfg = load_config(
        DPORunConfig,
        DPO_TINY,
        RUN + [f"checkpoint.init_from={init}", f"dpo.eval_files=[{held_out}]", *overrides],
    )
    ps = build_parallel_state(cfg.parallel.tp, cfg.parallel.pp)
    DPOTrainer(cfg, ps, os.path.join(root, name)).train()


def _runs(rank, world, runs, root, init, held_out):
    os.environ["LOCAL_RANK"] = str(rank)
    os.chdir(ROOT)
    for name, overrides in runs.items():
        _train(name, overrides, root, init, held_out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", EXT_DIR)
    tmp = tmp_path_factory.mktemp("dpo_parallel")
    from megarlhf.config import load_config
    from megarlhf.config.dpo import DPORunConfig

    save_lm_checkpoint(tmp / "lm", load_config(DPORunConfig, DPO_TINY).model, seed=5)
    held_out = tmp / "held_out.jsonl"  # 12 prompts of the shipped held-out set: short evaluations
    lines = (ROOT / "data" / "rm_tiny_eval.jsonl").read_text().splitlines()[:EVAL_PROMPTS]
    held_out.write_text("\n".join(lines) + "\n")
    args = (str(tmp / "runs"), str(tmp / "lm"), str(held_out))
    run_ranks(_runs, 1, SINGLE, *args, timeout=300)
    run_ranks(_runs, 2, {k: v for k, (_, v) in WORLD.items()}, *args, timeout=420)
    return tmp / "runs"


def _close(a, b):
    # Margins and implicit rewards are beta times differences of summed log-probs of about -100:
    # an fp32 ulp there is 8e-6, so they agree to a few 1e-5 absolute, the rest to 1e-5 relative.
    assert a == pytest.approx(b, rel=1e-5, abs=3e-5)


@pytest.mark.parametrize("name", list(WORLD))
def test_layout_equals_the_single_process_run(runs, name):
    ref_name = WORLD[name][0]
    ref, run = metrics(runs / ref_name), metrics(runs / name)
    assert [r["step"] for r in run] == list(range(1, STEPS + 1))
    for a, b in zip(run, ref, strict=True):
        assert a["prompts"] == b["prompts"] == 8 and a["pairs"] == b["pairs"] > 8
        for k in KEYS:
            if k == "accuracy" and b["margin"] == 0:
                # Step 1 is at the reference: every margin is 0 in the single run, and +-1e-7 of
                # rounding where the reference was precomputed by another forward, so the sign
                # count (accuracy) is noise there; the margins are compared instead.
                continue
            _close(a[k], b[k])
    last, want = run[-1], ref[-1]
    assert last["eval_prompts"] == want["eval_prompts"] == EVAL_PROMPTS
    for k in ("eval_loss", "eval_accuracy", "eval_margin", "eval_chosen_reward"):
        _close(last[k], want[k])
    got, exp = final_weights(runs / name), final_weights(runs / ref_name)
    assert got.keys() == exp.keys()
    for k, w in exp.items():
        torch.testing.assert_close(got[k], w, rtol=1e-4, atol=5e-6, msg=k)


def test_the_runs_learned_something(runs):
    """The comparisons are not between frozen models: the policy moved away from the reference
    (step 1 starts at it exactly: loss log 2 for DPO, margin 0)."""
    for name in SINGLE:
        recs = metrics(runs / name)
        assert recs[0]["margin"] == 0 and recs[0]["accuracy"] == 0
        assert abs(recs[-1]["margin"]) > 1e-3 and recs[-1]["accuracy"] > 0.5
    assert metrics(runs / "single")[0]["loss"] == pytest.approx(0.6931471805599453, rel=1e-6)
