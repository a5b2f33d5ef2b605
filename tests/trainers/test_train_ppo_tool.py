"""tools/train_ppo.py: under torchrun on 2 ranks (training and generation DP 2) it writes every
metric key each step; from checkpoints (an SFT-format actor, an RM-format reward model) in one
plain process; and bad inputs (empty prompt file, a prompt longer than the context, a reward
model / critic whose shape does not match the actor, a bad key value) exit 2 with one line naming
the problem, before any training; two deepspeed launchers simulating two nodes equal torchrun; a
kill inside a checkpoint save (MEGARLHF_FAULT=save:N) resumes bitwise."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from megarlhf.checkpoint import atomic
from tests.trainers.common import (
    BIN,
    QUIET,
    ROOT,
    assert_bitwise_equal,
    check,
    env,
    final_weights,
    free_port,
    metrics,
)
from tests.trainers.ppo_common import PPO_TINY

TOOL = str(ROOT / "tools" / "train_ppo.py")
FAST = QUIET + [
    "ppo.max_steps=2",
    "ppo.rollout_batch_size=8",
    "ppo.micro_batch_size=4",
    "ppo.ptx_batch_size=4",
    "generation.max_new_tokens=8",
]
KEYS = (
    "step reward_mean reward_std kl kl_coef non_score_reward entropy clipfrac approx_kl "
    "value_loss policy_loss explained_variance response_length logprob_mismatch ptx_loss "
    "tokens_per_s time_generate time_reshard time_actor_forward time_reference_forward "
    "time_values time_reward "
    "time_advantages time_update_actor time_update_critic"
).split()


def _run(cmd, out, overrides, timeout=240, env_extra=None):
    full = cmd + ["--config", PPO_TINY, "--output-dir", str(out), *FAST, *overrides]
    return subprocess.run(
        full, env=env(**(env_extra or {})), capture_output=True, text=True, timeout=timeout,
        cwd=ROOT,
    )  # fmt: skip


def _model_ckpt(path, head: str, **shape) -> None:
    from megarlhf.checkpoint.model_shards import save_model_shard
    from megarlhf.config import load_config
    from megarlhf.config.ppo import PPORunConfig
    from megarlhf.model.gpt import GPTModel
    from megarlhf.parallel.state import single_process_state

    cfg = load_config(PPORunConfig, PPO_TINY).model
    cfg = type(cfg)(**{**vars(cfg), "head": head, **shape})
    model = GPTModel(cfg, single_process_state(), seed=11)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    save_model_shard(path, weights, cfg, tp=1, tp_rank=0, pp=1, pp_rank=0)


@pytest.mark.timeout(300)
def test_torchrun_two_ranks_writes_every_metric(tmp_path):
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())]
    check(_run(cmd + [TOOL], tmp_path, []))  # training DP 2, generation DP 2
    recs = metrics(tmp_path)
    assert [r["step"] for r in recs] == [1, 2]
    for r in recs:
        missing = [k for k in KEYS if k not in r]
        assert not missing, missing
        assert r["logprob_mismatch"] <= 1e-5
        assert r["time_reshard"] > 0 and r["time_generate"] > 0
        assert r["ptx_loss"] > 0
    final = tmp_path / "checkpoints" / "step_000002"
    assert (final / "model").is_dir() and (final / "critic" / "model").is_dir()


@pytest.mark.timeout(300)
def test_from_sft_and_rm_checkpoints(tmp_path):
    _model_ckpt(tmp_path / "sft", "lm")
    _model_ckpt(tmp_path / "rm", "scalar")
    out = tmp_path / "run"
    proc = check(
        _run(
            [sys.executable, TOOL],
            out,
            ["--init-from", str(tmp_path / "sft"), f"ppo.reward_model={tmp_path / 'rm'}"],
        )
    )
    assert "random initialization" not in proc.stderr
    assert len(metrics(out)) == 2


@pytest.mark.timeout(300)
def test_kill_inside_a_save_then_resume_is_bitwise(tmp_path):
    """MEGARLHF_FAULT=save:2 kills the run inside step 2's checkpoint (files written, nothing
    committed); the torn folder is never loaded, and the run resumed from step 1 ends bitwise
    equal to an uninterrupted one, with the trainer_state.json of the checkpoint layout."""
    over = ["checkpoint.save_every=1", "checkpoint.keep_last=0", "ppo.max_steps=3"]
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    check(_run([sys.executable, TOOL], straight, over))
    killed = _run([sys.executable, TOOL], cut, over, env_extra={"MEGARLHF_FAULT": "save:2"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    torn = cut / "checkpoints" / ".tmp_step_000002"
    assert torn.is_dir() and not (torn / "COMPLETE.json").exists()
    assert [s for s, _ in atomic.list_checkpoints(cut / "checkpoints")] == [1]
    resumed = check(_run([sys.executable, TOOL], cut, over))
    assert "resumed from" in resumed.stderr and "step_000001" in resumed.stderr
    assert_bitwise_equal(final_weights(cut), final_weights(straight))
    for sub in ("critic",):
        a, b = (atomic.find_latest(r / "checkpoints") / sub for r in (cut, straight))
        assert_bitwise_equal(_weights(a), _weights(b))
    state = json.loads((atomic.find_latest(cut / "checkpoints") / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["stage"] == "ppo" and state["samples"] == 3 * 8


def _weights(ckpt) -> dict:
    from megarlhf.checkpoint.model_shards import ModelShardsReader

    with ModelShardsReader(ckpt) as r:
        return {n: r.full_tensor(n) for n in r.names()}


def _error(tmp_path, overrides) -> str:
    proc = _run([sys.executable, TOOL], tmp_path / "out", overrides, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
    return proc.stderr


def test_empty_prompt_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert "no prompts" in _error(tmp_path, [f"data.prompt_files=[{empty}]"])


def test_prompt_longer_than_context(tmp_path):
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "word " * 200}) + "\n")
    err = _error(tmp_path, [f"data.prompt_files=[{long}]"])
    assert "exceeds data.max_prompt_len=64" in err and "long.jsonl:1" in err


def test_critic_shape_mismatch(tmp_path):
    _model_ckpt(tmp_path / "rm", "scalar", hidden_size=32)
    err = _error(tmp_path, [f"ppo.reward_model={tmp_path / 'rm'}"])
    assert "model.hidden_size=32 (config has 64)" in err


def test_config_error_names_key(tmp_path):
    err = _error(tmp_path, ["ppo.kl_estimator=k9"])
    assert "ppo.kl_estimator" in err


@pytest.mark.timeout(300)
def test_simulated_two_node_launch(tmp_path):
    """One `deepspeed --no_ssh --node_rank i` launcher per simulated node (as on a cluster without
    pdsh) trains the same PPO run as torchrun on 2 ranks: equal metrics, bitwise equal actor."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = str(free_port())
    procs = []
    for node in range(2):
        cmd = [str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank",
               str(node), "--master_addr", "127.0.0.1", "--master_port", port, TOOL, "--config",
               PPO_TINY, "--output-dir", str(tmp_path / "nodes"), *FAST]  # fmt: skip
        procs.append(subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, cwd=ROOT))  # fmt: skip
    logs = [p.communicate(timeout=240)[0] for p in procs]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-4000:]
    assert "rank 0/2: tp 0/1, pp 0/1, dp 0/2" in logs[0]
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())]
    check(_run(cmd + [TOOL], tmp_path / "torchrun", []))
    a, b = metrics(tmp_path / "nodes"), metrics(tmp_path / "torchrun")
    for ra, rb in zip(a, b, strict=True):
        assert ra["reward_mean"] == rb["reward_mean"] and ra["policy_loss"] == rb["policy_loss"]
    assert_bitwise_equal(final_weights(tmp_path / "nodes"), final_weights(tmp_path / "torchrun"))
