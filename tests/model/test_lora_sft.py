"""LoRA through tools/train_sft.py (configs/sft_tiny.yaml, model.lora.rank=4, one process): the
run trains from a base checkpoint, its checkpoints hold the adapters only (our shards and
DeepSpeed's files), a run SIGKILLed after a checkpoint resumes bitwise (the base reloaded from
the recorded path), and `--init-from` a LoRA checkpoint starts a plain run from the merged
model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from megarlhf.checkpoint import atomic
from megarlhf.checkpoint.model_shards import read_meta, save_model_shard
from megarlhf.config import load_config
from megarlhf.config.sft import SFTRunConfig
from megarlhf.model.gpt import GPTModel
from megarlhf.parallel.state import single_process_state
from tests.trainers.common import (
    TINY,
    assert_bitwise_equal,
    check,
    final_weights,
    first_batch_loss,
    metrics,
    train,
)

STEPS = 6
RUN = ["model.lora.rank=4", "model.lora.alpha=8", "optim.lr=2e-2", f"sft.max_steps={STEPS}",
       "checkpoint.save_every=3", "checkpoint.keep_last=2"]  # fmt: skip


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A plain checkpoint of the tiny SFT model (the frozen base the LoRA runs start from)."""
    cfg = load_config(SFTRunConfig, TINY).model
    path = tmp_path_factory.mktemp("base")
    model = GPTModel(cfg, single_process_state(), seed=77)
    save_model_shard(path, model.state_dict(), cfg, tp=1, tp_rank=0, pp=1, pp_rank=0)
    return path


@pytest.fixture(scope="module")
def ref(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_ref")
    check(train(out, RUN, extra_args=["--init-from", str(base)]))
    return out


def test_lora_sft_trains_and_saves_the_adapters_only(ref, base):
    losses = [r["loss"] for r in metrics(ref)]
    assert len(losses) == STEPS and losses[-1] < losses[0] - 0.2, losses
    ckpt = atomic.find_latest(ref / "checkpoints")
    meta = read_meta(ckpt)
    assert meta.adapters.base.path == str(base.resolve()) and meta.adapters.lora.rank == 4
    with safe_open(ckpt / "model" / "tp00_pp00.safetensors", "pt") as f:
        stored = list(f.keys())
    assert stored and all(".lora." in n for n in stored)
    module = torch.load(ckpt / "deepspeed" / "state" / "mp_rank_00_model_states.pt",
                        weights_only=False)["module"]  # fmt: skip
    assert module and all(".lora." in n for n in module)
    # 2 layers x (qkv, proj, fc1, fc2) at r = 4 is 8,192 parameters; the base has ~140,000.
    adapter_bytes = (ckpt / "model" / "tp00_pp00.safetensors").stat().st_size
    base_bytes = (base / "model" / "tp00_pp00.safetensors").stat().st_size
    assert adapter_bytes < base_bytes / 10
    manifest = json.loads((ckpt / "COMPLETE.json").read_text())
    assert sum(manifest["files"].values()) < 2 * base_bytes  # adapters, Adam states, RNG, ...


def test_lora_sft_resumes_bitwise(ref, base, tmp_path):
    args = ["--init-from", str(base)]
    killed = train(tmp_path, RUN, fault="step:4", extra_args=args)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert atomic.find_latest(tmp_path / "checkpoints").name == "step_000003"
    resumed = check(train(tmp_path, RUN, extra_args=args))
    assert "resumed from" in resumed.stderr, resumed.stderr[-2000:]
    assert_bitwise_equal(final_weights(tmp_path), final_weights(ref))
    ref_recs, got = metrics(ref), metrics(tmp_path)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in got] == [r["loss"] for r in ref_recs]
    assert [r["grad_norm"] for r in got] == [r["grad_norm"] for r in ref_recs]


def test_init_from_a_lora_checkpoint_is_the_merged_model(ref, tmp_path):
    src = atomic.find_latest(ref / "checkpoints")
    overrides = ["sft.max_steps=1", "checkpoint.save_final=false"]
    check(train(tmp_path, overrides, extra_args=["--init-from", str(src)]))
    (rec,) = metrics(tmp_path)
    merged = final_weights(ref)  # the reader's merged view: W + (alpha / r) B A
    assert rec["loss"] == pytest.approx(first_batch_loss(merged, overrides), rel=1e-5)
    assert rec["loss"] < metrics(ref)[0]["loss"] - 0.1  # trained adapters, merged in
