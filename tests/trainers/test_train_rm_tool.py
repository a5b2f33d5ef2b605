"""tools/train_rm.py end to end: two ranks, init_from an SFT checkpoint, learning, metrics,
normalization in the final checkpoint, SIGKILL and resume under another launcher.

The reference is one uninterrupted 2-rank torchrun run of configs/rm_tiny.yaml (DP=2, ZeRO-1,
24 steps of 16 prompts, evaluation and a checkpoint every 8 steps) started from a language-model
checkpoint in the format the SFT stage writes. Against it:

* the first step's loss equals a plain-torch computation of the pair-by-pair loss on the first
  global batch with the SFT trunk and the fresh scalar head (so init_from loaded what it should);
* the model learns the separable synthetic preference (> 90% held-out pair accuracy, a few
  seconds of training) and both the training and held-out losses fall;
* the final checkpoint's reward has mean 0 over the demonstrations (plain torch, within 1e-5);
* a run SIGKILLed inside the checkpoint of step 16 (MEGARLHF_FAULT=save:16: files written, not
  committed) under torchrun leaves a torn temp folder that is never loaded, and resumed under the
  deepspeed launcher from step 8 ends with bitwise the same weights and the same metrics.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from megarlhf.checkpoint import atomic
from tests.trainers.common import (
    QUIET,
    ROOT,
    assert_bitwise_equal,
    check,
    env,
    final_weights,
    free_port,
    metrics,
)
from tests.trainers.rm_common import (
    RM_TINY,
    demo_reward_mean,
    last_token_rewards,
    pairwise_loss,
    save_lm_checkpoint,
)

TOOL = str(ROOT / "tools" / "train_rm.py")
BIN = sys.executable.rsplit("/", 1)[0]
STEPS = 24
RUN = QUIET + [
    f"rm.max_steps={STEPS}",
    "rm.eval_every=8",
    "checkpoint.save_every=8",
    "checkpoint.keep_last=2",
]
TIMEOUT = 240
FIELDS = {"loss", "accuracy", "margin", "reward_mean", "reward_std", "lr", "grad_norm"}
FIELDS |= {"tokens_per_s", "epoch", "prompts", "pairs"}


def _config(overrides=()):
    from megarlhf.config import load_config
    from megarlhf.config.rm import RMRunConfig

    return load_config(RMRunConfig, RM_TINY, list(overrides))


def _launch(launcher: str, out, extra: list[str], fault: str | None = None):
    port = str(free_port())
    if launcher == "torchrun":
        cmd = [f"{BIN}/torchrun", "--nproc_per_node", "2", "--master_port", port, TOOL]
    else:
        cmd = [f"{BIN}/deepspeed", "--num_gpus", "2", "--master_port", port, TOOL]
    cmd += ["--config", RM_TINY, "--output-dir", str(out), *RUN, *extra]
    e = env(**({"MEGARLHF_FAULT": fault} if fault else {}))
    return subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    """An SFT checkpoint of the rm_tiny model shape (language-model head)."""
    path = tmp_path_factory.mktemp("sft")
    lm = dataclasses.replace(_config().model, head="lm")
    return path, save_lm_checkpoint(path, lm, seed=99)


@pytest.fixture(scope="module")
def ref(tmp_path_factory, sft):
    out = tmp_path_factory.mktemp("rm_ref")
    proc = check(_launch("torchrun", out, [f"checkpoint.init_from={sft[0]}"]))
    assert "initialized the trunk from" in proc.stderr
    return out


def test_help_documents_usage():
    proc = subprocess.run(
        [sys.executable, TOOL, "--help"], capture_output=True, text=True, timeout=60, env=env()
    )
    assert proc.returncode == 0, proc.stderr
    for needle in ("--config", "--output-dir", "--resume-from", "--init-from", "torchrun",
                   "deepspeed --num_gpus", "rm.micro_batch_size=2"):  # fmt: skip
        assert needle in proc.stdout, needle


def test_bad_config_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, TOOL, "--config", RM_TINY, "--output-dir", str(tmp_path), "model.head=lm"],
        capture_output=True, text=True, timeout=60, env=env(), cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "model.head: a reward model needs model.head=scalar, got 'lm'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_trains_learns_and_records(ref):
    recs = metrics(ref)
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    for r in recs:
        assert FIELDS <= r.keys(), FIELDS - r.keys()
        assert r["prompts"] == 16 and r["pairs"] > 16
    evals = [r for r in recs if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [8, 16, 24]
    assert all(r["eval_prompts"] == 64 for r in evals)
    losses = [r["loss"] for r in recs]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.2, losses
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert evals[-1]["eval_accuracy"] > 0.9, [r["eval_accuracy"] for r in evals]
    assert recs[-1]["reward_std"] > 0.5  # the rewards spread out


def test_first_step_starts_from_the_sft_trunk_and_a_fresh_head(ref, sft):
    from megarlhf.data.rankings import load_ranking_dataset
    from megarlhf.data.sampler import ResumableSampler
    from megarlhf.data.tokenizer import load_tokenizer
    from megarlhf.model.gpt import GPTModel
    from megarlhf.parallel.state import single_process_state

    cfg = _config()
    model = GPTModel(cfg.model, single_process_state(), seed=cfg.rm.loop.seed)
    trunk = {k: v for k, v in sft[1].items() if k != "output.weight"}
    missing, unexpected = model.load_state_dict(trunk, strict=False)
    assert sorted(missing) == ["head.bias", "head.weight"] and not unexpected
    tok = load_tokenizer(ROOT / cfg.data.text.tokenizer)
    data = load_ranking_dataset([str(ROOT / f) for f in cfg.data.train_files], tok, 128)
    (first,) = ResumableSampler(len(data.samples), 16, 1, 0, 1, cfg.data.seed).next_step()
    samples = [data.samples[i] for i in first]
    rewards = last_token_rewards(model.eval(), [c for s in samples for c in s.completions])
    ranks = [r for s in samples for r in s.ranks]
    want = pairwise_loss(rewards, ranks, [len(s.completions) for s in samples]).item()
    assert metrics(ref)[0]["loss"] == pytest.approx(want, rel=1e-5)


def test_final_checkpoint_is_normalized_on_the_demonstrations(ref):
    from megarlhf.model.gpt import GPTModel
    from megarlhf.parallel.state import single_process_state

    last = metrics(ref)[-1]
    ckpt = atomic.find_latest(ref / "checkpoints")
    assert ckpt.name == f"step_{STEPS:06d}"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["reward_offset"] == pytest.approx(last["demo_reward_mean"], rel=1e-12)
    assert abs(last["demo_reward_mean"]) > 0.01  # there was something to normalize
    model = GPTModel(_config().model, single_process_state(), seed=0)
    model.load_state_dict(final_weights(ref), strict=True)
    assert abs(demo_reward_mean(model)) < 1e-5


def test_kill_then_resume_under_another_launcher_is_bitwise(ref, sft, tmp_path):
    out = tmp_path / "killed"
    extra = [f"checkpoint.init_from={sft[0]}"]  # ignored on resume
    killed = _launch("torchrun", out, extra, fault="save:16")
    assert killed.returncode != 0
    root = out / "checkpoints"
    torn = root / ".tmp_step_000016"
    assert torn.is_dir() and not (torn / "COMPLETE.json").exists()
    assert [step for step, _ in atomic.list_checkpoints(root)] == [8]
    resumed = check(_launch("deepspeed", out, extra))
    assert "resumed from" in resumed.stderr
    assert_bitwise_equal(final_weights(out), final_weights(ref))
    got, want = metrics(out), metrics(ref)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for a, b in zip(got, want, strict=True):
        for k in ("loss", "accuracy", "grad_norm", "reward_mean", "eval_loss", "reward_offset"):
            assert a.get(k) == b.get(k), (a["step"], k)
    assert _trainer_state(out) == {**_trainer_state(ref)}


def _trainer_state(run) -> dict:
    return json.loads((atomic.find_latest(run / "checkpoints") / "trainer_state.json").read_text())
