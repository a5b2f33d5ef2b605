"""tools/train_dpo.py end to end: from an SFT-format checkpoint (also the reference), learning,
metrics, SIGKILL and bitwise resume with the reference forwarded per batch and precomputed.

* In-loop reference: one uninterrupted 2-rank torchrun run of configs/dpo_tiny.yaml (DP=2,
  ZeRO-1, 8 steps of 16 prompts, evaluation and a checkpoint every 4 steps) starts at the
  reference exactly (loss log 2, margin 0) and learns the synthetic preference (held-out pair
  accuracy and margin up, loss down). A run killed right after step 6 (MEGARLHF_FAULT=step:6)
  and resumed from step 4 under the deepspeed launcher ends with bitwise the same weights and
  the same metrics (the reference is rebuilt from checkpoint.init_from, not from the checkpoint).
* Precomputed reference (dpo.precompute_reference=true, one plain process): the column saved in
  the checkpoint equals plain-torch log-probs of the SFT weights; a run killed inside the
  checkpoint of step 8 (MEGARLHF_FAULT=save:8) resumes from step 4 without recomputing it and ends
  bitwise equal to the uninterrupted run.
* A bad config is one line and exit 2.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

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
from tests.trainers.rm_common import save_lm_checkpoint

TOOL = str(ROOT / "tools" / "train_dpo.py")
DPO_TINY = str(ROOT / "configs" / "dpo_tiny.yaml")
BIN = sys.executable.rsplit("/", 1)[0]
STEPS = 8
RUN = QUIET + [f"dpo.max_steps={STEPS}", "dpo.eval_every=4", "checkpoint.save_every=4"]
TIMEOUT = 240
FIELDS = {"loss", "accuracy", "margin", "chosen_reward", "rejected_reward", "lr", "grad_norm"}
FIELDS |= {"tokens", "tokens_per_s", "epoch", "prompts", "pairs"}
COMPARED = ("loss", "accuracy", "margin", "chosen_reward", "grad_norm", "eval_loss", "eval_margin")


def _launch(launcher: str, out, extra: list[str], fault: str | None = None):
    port = str(free_port())
    if launcher == "torchrun":
        cmd = [f"{BIN}/torchrun", "--nproc_per_node", "2", "--master_port", port, TOOL]
    elif launcher == "deepspeed":
        cmd = [f"{BIN}/deepspeed", "--num_gpus", "2", "--master_port", port, TOOL]
    else:
        cmd = [sys.executable, TOOL]
    cmd += ["--config", DPO_TINY, "--output-dir", str(out), *RUN, *extra]
    e = env(**({"MEGARLHF_FAULT": fault} if fault else {}))
    return subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    """A checkpoint in the format an SFT run writes, of the dpo_tiny model."""
    from megarlhf.config import load_config
    from megarlhf.config.dpo import DPORunConfig

    path = tmp_path_factory.mktemp("sft")
    return path, save_lm_checkpoint(path, load_config(DPORunConfig, DPO_TINY).model, seed=99)


@pytest.fixture(scope="module")
def ref(tmp_path_factory, sft):
    out = tmp_path_factory.mktemp("dpo_ref")
    proc = check(_launch("torchrun", out, ["--init-from", str(sft[0])]))
    assert "initialized weights from" in proc.stderr
    return out


@pytest.fixture(scope="module")
def ref_pre(tmp_path_factory, sft):
    out = tmp_path_factory.mktemp("dpo_pre")
    extra = ["--init-from", str(sft[0]), "dpo.precompute_reference=true"]
    proc = check(_launch("plain", out, extra))
    assert "reference log-probs precomputed for 1765 completions" in proc.stderr
    return out


def test_bad_config_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, TOOL, "--config", DPO_TINY, "--output-dir", str(tmp_path),
         "dpo.loss=ipo", "dpo.label_smoothing=0.1"],
        capture_output=True, text=True, timeout=60, env=env(), cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == [
        f"train_dpo.py: error: {DPO_TINY}: dpo.label_smoothing: 0.1 applies to dpo.loss=dpo "
        "only (got dpo.loss=ipo)"
    ]


def test_starts_at_the_reference_and_learns(ref):
    recs = metrics(ref)
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    for r in recs:
        assert FIELDS <= r.keys(), FIELDS - r.keys()
        assert r["prompts"] == 16 and r["pairs"] > 16
    first = recs[0]
    assert first["loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert first["margin"] == 0 and first["accuracy"] == 0
    evals = [r for r in recs if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [4, 8] and all(r["eval_prompts"] == 64 for r in evals)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] < math.log(2)
    assert evals[-1]["eval_accuracy"] > 0.8 and evals[-1]["eval_margin"] > evals[0]["eval_margin"]
    # The winners' log-ratio rises against the losers' (the implicit rewards spread apart).
    assert recs[-1]["chosen_reward"] > recs[-1]["rejected_reward"]


def test_kill_then_resume_under_another_launcher_is_bitwise(ref, sft, tmp_path):
    out = tmp_path / "killed"
    extra = ["--init-from", str(sft[0])]  # the reference's source; the policy's is ignored
    killed = _launch("torchrun", out, extra, fault="step:6")
    assert killed.returncode != 0
    assert [step for step, _ in atomic.list_checkpoints(out / "checkpoints")] == [4]
    resumed = check(_launch("deepspeed", out, extra))
    assert "resumed from" in resumed.stderr
    _same_run(out, ref)


def _same_run(out, ref):
    assert_bitwise_equal(final_weights(out), final_weights(ref))
    got, want = metrics(out), metrics(ref)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for a, b in zip(got, want, strict=True):
        for k in COMPARED:
            assert a.get(k) == b.get(k), (a["step"], k)


def test_precomputed_reference_is_the_sft_model(ref_pre, sft):
    from megarlhf.config import load_config
    from megarlhf.config.dpo import DPORunConfig
    from megarlhf.data.ranking_loader import collate_preferences, load_preference_dataset
    from megarlhf.data.tokenizer import load_tokenizer
    from megarlhf.model.gpt import GPTModel
    from megarlhf.parallel.state import single_process_state

    ckpt = atomic.find_latest(ref_pre / "checkpoints")
    table = torch.load(ckpt / "trainer" / "rank_00000.pt")["loader"]["reference_logps"]
    cfg = load_config(DPORunConfig, DPO_TINY)
    model = GPTModel(cfg.model, single_process_state(), seed=0)
    model.load_state_dict(sft[1], strict=True)
    tok = load_tokenizer(ROOT / "data" / "tokenizer")
    data = load_preference_dataset([str(ROOT / "data" / "rm_tiny.jsonl")], tok, 128)
    mb = collate_preferences(data.samples[:6], tok.pad_id, [0] * 6)
    with torch.no_grad():
        logits = model(mb["input_ids"], attention_mask=mb["attention_mask"]).double()
    logp = torch.log_softmax(logits[..., : cfg.model.vocab_size], -1).flatten(0, 1)
    token = logp[mb["output_index"], mb["labels"]]
    want = torch.zeros(len(mb["ranks"]), dtype=torch.float64).index_add(0, mb["token_seq"], token)
    torch.testing.assert_close(table[: len(want)].double(), want, rtol=1e-5, atol=1e-4)
    assert table.shape == (1765,) and (table < -1).all()


def test_precomputed_kill_inside_a_save_then_resume_is_bitwise(ref_pre, sft, tmp_path):
    out = tmp_path / "killed_pre"
    extra = ["--init-from", str(sft[0]), "dpo.precompute_reference=true"]
    killed = _launch("plain", out, extra, fault="save:8")
    assert killed.returncode != 0
    torn = out / "checkpoints" / ".tmp_step_000008"
    assert torn.is_dir() and not (torn / "COMPLETE.json").exists()
    resumed = check(_launch("plain", out, extra))
    assert "resumed from" in resumed.stderr
    assert "reference log-probs precomputed" not in resumed.stderr  # the saved column is used
    _same_run(out, ref_pre)
