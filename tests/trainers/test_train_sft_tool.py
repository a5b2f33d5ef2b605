"""tools/train_sft.py end to end: launchers, observability, checkpoints, SIGKILL and resume.

The reference is one uninterrupted 2-rank torchrun run (DP=2, ZeRO-1, fp32, 12 steps over an
epoch boundary at step 9, a checkpoint every 3 steps). Against it:

* the deepspeed launcher, and two deepspeed launchers simulating two nodes (`--no_ssh
  --node_rank i`), train the same model;
* a run SIGKILLed at a random step (from outside, whole process group) and resumed ends with
  bitwise the same weights and the same metrics;
* resuming at another TP size is refused with a pointer to the re-sharding tool.

And against a 1-process reference: a kill exactly at the epoch boundary, and a kill inside a
checkpoint save (the torn temp dir is never loaded), both resume bitwise.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys

import pytest
import torch

from megarlhf.checkpoint import atomic
from tests.trainers.common import (
    TINY,
    TOOL,
    assert_bitwise_equal,
    check,
    command,
    env,
    final_weights,
    first_batch_loss,
    free_port,
    kill_when,
    metrics,
    train,
)

STEPS, STEPS_PER_EPOCH = 12, 9
RUN = [f"sft.max_steps={STEPS}", "checkpoint.save_every=3", "checkpoint.keep_last=2"]
TIMEOUT = 240


@pytest.fixture(scope="module")
def torchrun_ref(tmp_path_factory):
    out = tmp_path_factory.mktemp("torchrun_ref")
    check(train(out, RUN + ["logging.tensorboard=true"], "torchrun", 2))
    return out


@pytest.fixture(scope="module")
def plain_ref(tmp_path_factory):
    out = tmp_path_factory.mktemp("plain_ref")
    check(train(out, RUN))
    return out


def _loss_decreases(out):
    recs = metrics(out)
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    assert recs[-1]["loss"] < recs[0]["loss"] - 0.5, [r["loss"] for r in recs]


def test_help_documents_usage():
    proc = subprocess.run(
        [sys.executable, TOOL, "--help"], capture_output=True, text=True, timeout=60, env=env()
    )
    assert proc.returncode == 0, proc.stderr
    for needle in ("--config", "--output-dir", "--resume", "torchrun", "deepspeed --num_gpus",
                   "--hostfile", "optim.lr=1e-4"):  # fmt: skip
        assert needle in proc.stdout, needle


def test_user_errors_are_one_line_and_exit_2(tmp_path):
    proc = train(tmp_path / "a", ["deepspeed.zero_stage=3", "parallel.pp=2"])
    assert proc.returncode == 2
    assert "error: " in proc.stderr and "deepspeed.zero_stage: 3 is not supported" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = train(tmp_path / "b", [], extra_args=["--resume"])
    assert proc.returncode == 2
    assert "ResumeError: --resume: no complete checkpoint under" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_torchrun_two_ranks_trains_and_records(torchrun_ref):
    _loss_decreases(torchrun_ref)
    for rec in metrics(torchrun_ref):
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "epoch"} <= rec.keys()
        assert rec["tokens_per_s"] > 0
    assert [r["epoch"] for r in metrics(torchrun_ref)] == [0] * 9 + [1] * 3
    assert (torchrun_ref / "config.yaml").is_file()
    assert list((torchrun_ref / "tensorboard").glob("events.out.tfevents.*"))
    root = torchrun_ref / "checkpoints"
    assert [s for s, _ in atomic.list_checkpoints(root)] == [9, 12]  # keep_last=2
    latest = atomic.find_latest(root)
    assert latest.name == "step_000012"
    for rel in ("model/meta.json", "model/tp00_pp00.safetensors", "config.yaml",
                "rng/rank_00000.pt", "rng/rank_00001.pt", "trainer/rank_00001.pt"):  # fmt: skip
        assert (latest / rel).is_file(), rel
    assert list((latest / "deepspeed" / "state").glob("zero_pp_rank_1_*optim_states.pt"))


def test_deepspeed_launcher_matches_torchrun(torchrun_ref, tmp_path):
    check(train(tmp_path, RUN, "deepspeed", 2))
    _loss_decreases(tmp_path)
    assert_bitwise_equal(final_weights(tmp_path), final_weights(torchrun_ref))


def test_simulated_two_node_launch(torchrun_ref, tmp_path):
    """One `deepspeed --no_ssh --node_rank i` launcher per simulated node, as on a cluster
    without pdsh: DeepSpeed derives the world from the hostfile, each launcher starts its node."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = str(free_port())
    out = tmp_path / "run"
    procs = []
    for node in range(2):
        cmd = [str(command("deepspeed")[0]), "--hostfile", str(hostfile), "--no_ssh",
               "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", port,
               TOOL, "--config", TINY, "--output-dir", str(out),
               "logging.progress_bar=false", "logging.tensorboard=false", *RUN]  # fmt: skip
        procs.append(subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))  # fmt: skip
    logs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-4000:]
    assert "rank 0/2: tp 0/1, pp 0/1, dp 0/2" in logs[0]
    _loss_decreases(out)
    assert_bitwise_equal(final_weights(out), final_weights(torchrun_ref))


def test_sigkill_at_random_step_then_resume_is_bitwise(torchrun_ref, tmp_path):
    kill_at = random.Random().randint(4, STEPS - 1)  # after the first checkpoint (step 3)
    cmd = command("torchrun", 2) + ["--config", TINY, "--output-dir", str(tmp_path),
                                    "logging.progress_bar=false", "logging.tensorboard=false",
                                    "logging.log_every=0", *RUN]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    seen = kill_when(proc, tmp_path, kill_at, timeout=TIMEOUT)
    assert seen < STEPS, f"the run finished ({seen} steps) before the kill at step {kill_at}"
    resumed = check(train(tmp_path, RUN, "torchrun", 2))
    assert "resumed from" in resumed.stderr, resumed.stderr[-2000:]
    assert_bitwise_equal(final_weights(tmp_path), final_weights(torchrun_ref))
    ref, got = metrics(torchrun_ref), metrics(tmp_path)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1)), f"killed at {kill_at}"
    assert [r["loss"] for r in got] == [r["loss"] for r in ref]
    assert [r["grad_norm"] for r in got] == [r["grad_norm"] for r in ref]


def test_resume_with_another_tp_is_refused(torchrun_ref, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(torchrun_ref, out)
    proc = train(out, RUN + ["parallel.tp=2"], "torchrun", 2)
    assert proc.returncode != 0
    assert "saved at tp=1, pp=1 but this run uses tp=2, pp=1" in proc.stderr
    assert "tools/convert_hf.py --reshard" in proc.stderr
    assert [s for s, _ in atomic.list_checkpoints(out / "checkpoints")] == [9, 12]


def test_init_from_loads_weights_at_another_layout(torchrun_ref, tmp_path):
    """checkpoint.init_from re-shards a DP=2 (tp=1, pp=1) checkpoint onto PP=2: the first step's
    loss is that of the source weights on the first batch, computed here in plain torch."""
    src = atomic.find_latest(torchrun_ref / "checkpoints")
    overrides = ["sft.max_steps=1", "checkpoint.save_final=false", "parallel.pp=2"]
    check(train(tmp_path, overrides, "torchrun", 2, extra_args=["--init-from", str(src)]))
    (rec,) = metrics(tmp_path)
    want = first_batch_loss(final_weights(torchrun_ref), overrides)
    assert rec["loss"] == pytest.approx(want, rel=1e-5)
    assert rec["loss"] < metrics(torchrun_ref)[0]["loss"] - 0.5  # trained, not a fresh init


def test_sigkill_exactly_at_epoch_boundary_then_resume_is_bitwise(plain_ref, tmp_path):
    overrides = RUN + ["checkpoint.save_every=9"]
    killed = train(tmp_path, overrides, fault=f"step:{STEPS_PER_EPOCH}")
    assert killed.returncode == -9, killed.stderr[-2000:]
    latest = atomic.find_latest(tmp_path / "checkpoints")
    assert latest.name == "step_000009"
    loader = torch.load(latest / "trainer" / "rank_00000.pt", weights_only=True)["loader"]
    assert (loader["epoch"], loader["position"]) == (1, 0)  # exactly at the boundary
    resumed = check(train(tmp_path, overrides))
    assert "resumed from" in resumed.stderr and "step_000009" in resumed.stderr
    assert_bitwise_equal(final_weights(tmp_path), final_weights(plain_ref))
    assert [r["loss"] for r in metrics(tmp_path)] == [r["loss"] for r in metrics(plain_ref)]


def test_torn_checkpoint_is_never_loaded(plain_ref, tmp_path):
    killed = train(tmp_path, RUN, fault="save:6")
    assert killed.returncode == -9, killed.stderr[-2000:]
    root = tmp_path / "checkpoints"
    torn = root / ".tmp_step_000006"
    assert torn.is_dir() and (torn / "model").is_dir() and not (torn / "COMPLETE.json").exists()
    assert atomic.find_latest(root).name == "step_000003"
    resumed = check(train(tmp_path, RUN))
    assert "step_000003" in resumed.stderr
    assert_bitwise_equal(final_weights(tmp_path), final_weights(plain_ref))


def test_save_only_model_writes_the_weights_and_refuses_resume(plain_ref, tmp_path):
    """checkpoint.save_only_model: the same training (weights bitwise those of the reference
    run), checkpoints without DeepSpeed's state (no optimizer moments, no module copy), recorded
    in the manifest; launching the run again refuses to resume from one, naming the key."""
    overrides = RUN + ["checkpoint.save_only_model=true"]
    check(train(tmp_path, overrides))
    assert_bitwise_equal(final_weights(tmp_path), final_weights(plain_ref))
    root = tmp_path / "checkpoints"
    assert [s for s, _ in atomic.list_checkpoints(root)] == [9, 12]
    latest, full = atomic.find_latest(root), atomic.find_latest(plain_ref / "checkpoints")
    assert atomic.read_manifest(latest)["meta"]["model_only"] is True
    assert "model_only" not in atomic.read_manifest(full)["meta"]
    assert (full / "deepspeed").is_dir() and not (latest / "deepspeed").exists()
    assert atomic.incomplete_reason(latest) is None  # a complete, checksummed checkpoint
    again = train(tmp_path, overrides)
    assert again.returncode == 2, again.stderr[-2000:]
    assert "saved with checkpoint.save_only_model=true" in again.stderr
    assert f"checkpoint.init_from={latest}" in again.stderr
