"""User errors of every tool are one line `<tool>: error: <message>` and exit 2, never a traceback.

One plain process per case: a layout that does not divide the world, a missing, incomplete or
corrupt `--init-from` / `ppo.reward_model`, a missing generation checkpoint, a bad preset, input
or output. And one 2-rank torchrun case where only rank 1 meets the error (its own shard of a
TP=2 `--init-from` is corrupt): rank 1 says so in one line and the whole job ends, rank 0
included, instead of rank 0 waiting on its peer.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megarlhf.checkpoint.model_shards import (
    ModelShardsReader,
    ModelShardsWriter,
    rank_file,
    save_model_shard,
)
from megarlhf.config import load_config
from megarlhf.config.sft import SFTRunConfig
from megarlhf.model.gpt import GPTModel
from megarlhf.parallel.state import single_process_state
from tests.trainers.common import QUIET, ROOT, TINY, command, env

TOOLS = ROOT / "tools"
PPO_TINY = str(ROOT / "configs" / "ppo_tiny.yaml")
RM_TINY = str(ROOT / "configs" / "rm_tiny.yaml")
TOKENIZER = str(ROOT / "data" / "tokenizer")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """Checkpoints of the tiny SFT model: whole at TP=1 and TP=2, and broken copies."""
    root = tmp_path_factory.mktemp("ckpts")
    cfg = load_config(SFTRunConfig, TINY, []).model
    model = GPTModel(cfg, single_process_state(), seed=0)
    good = root / "good"
    save_model_shard(good, model.state_dict(), cfg, tp=1, tp_rank=0, pp=1, pp_rank=0)
    with ModelShardsReader(good) as r:
        full = {name: r.full_tensor(name) for name in r.names()}
    tp2 = root / "tp2"
    w = ModelShardsWriter(tp2, cfg, 2, 1, {n: (tuple(t.shape), t.dtype) for n, t in full.items()})
    for name, t in full.items():
        w.write(name, t)
    w.close()
    incomplete = root / "incomplete"
    save_model_shard(incomplete, model.state_dict(), cfg, tp=1, tp_rank=0, pp=1, pp_rank=0)
    rank_file(incomplete, 0, 0).unlink()  # meta.json without the weights
    corrupt = root / "corrupt"
    save_model_shard(corrupt, model.state_dict(), cfg, tp=1, tp_rank=0, pp=1, pp_rank=0)
    rank_file(corrupt, 0, 0).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    rm_cfg = dataclasses.replace(cfg, head="scalar", num_head_outputs=1)
    rm_corrupt = root / "rm_corrupt"  # a reward model's meta.json, a corrupt weights file
    rm = GPTModel(rm_cfg, single_process_state(), seed=0)
    save_model_shard(rm_corrupt, rm.state_dict(), rm_cfg, tp=1, tp_rank=0, pp=1, pp_rank=0)
    rank_file(rm_corrupt, 0, 0).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    return {"good": good, "tp2": tp2, "incomplete": incomplete, "corrupt": corrupt,
            "rm_corrupt": rm_corrupt, "missing": root / "missing"}  # fmt: skip


def _argv(tool: str, *args: str):
    """argv of `python tools/<tool> args`, given the checkpoints `c` and a scratch dir `t`;
    "{missing}", "{corrupt}", ..., "{tmp}" in args name them."""

    def build(c: dict[str, Path], t: Path) -> list[str]:
        return [sys.executable, str(TOOLS / tool), *(x.format(**c, tmp=t) for x in args)]

    return build


def _train(tool: str, config: str, *args: str):
    return _argv(tool, "--config", config, "--output-dir", "{tmp}/run", *QUIET, *args)


def _generate(*args: str):
    return _argv("generate.py", "--prompt", "Hi", "--tokenizer", TOKENIZER, *args)


# (case id, argv builder, tool, words the error line must hold)
CASES = [
    ("sft-layout", _train("train_sft.py", TINY, "parallel.tp=3"), "train_sft.py",
     ["LayoutError", "not divisible by parallel.tp * parallel.pp = 3 * 1 = 3"]),
    ("sft-init-from-missing", _train("train_sft.py", TINY, "--init-from", "{missing}"),
     "train_sft.py", ["CheckpointError", "missing"]),
    ("sft-init-from-incomplete", _train("train_sft.py", TINY, "--init-from", "{incomplete}"),
     "train_sft.py", ["tp00_pp00.safetensors"]),
    ("sft-init-from-corrupt", _train("train_sft.py", TINY, "--init-from", "{corrupt}"),
     "train_sft.py", ["tp00_pp00.safetensors"]),
    ("rm-layout", _train("train_rm.py", RM_TINY, "parallel.tp=2", "parallel.pp=2"),
     "train_rm.py", ["LayoutError", "= 2 * 2 = 4"]),
    ("ppo-reward-model-missing", _train("train_ppo.py", PPO_TINY, "ppo.reward_model={missing}"),
     "train_ppo.py", ["missing"]),
    ("ppo-reward-model-corrupt", _train("train_ppo.py", PPO_TINY, "ppo.reward_model={rm_corrupt}"),
     "train_ppo.py", ["tp00_pp00.safetensors"]),
    ("generate-checkpoint-missing", _generate("--checkpoint", "{missing}"), "generate.py",
     ["missing"]),
    ("generate-checkpoint-corrupt", _generate("--checkpoint", "{corrupt}"), "generate.py",
     ["tp00_pp00.safetensors"]),
    ("generate-tp", _generate("--checkpoint", "{good}", "--tp", "2"), "generate.py", ["--tp 2"]),
    ("generate-prompts-file", _generate("--checkpoint", "{good}", "--prompts-file",
     "{tmp}/none.jsonl"), "generate.py", ["--prompts-file", "none.jsonl"]),
    ("plan-preset", _argv("plan.py", "--model", "nope"), "plan.py", ["--model: no preset 'nope'"]),
    ("bench-layout", _argv("bench_throughput.py", "--tp", "2", "--iters", "1"),
     "bench_throughput.py", ["LayoutError", "not divisible"]),
    ("tokenizer-input", _argv("train_tokenizer.py", "--input", "{tmp}/none.txt", "--output",
     "{tmp}/tok"), "train_tokenizer.py", ["--input", "none.txt"]),
    ("smollm2-out-exists", _argv("import_smollm2.py", "{tmp}"), "import_smollm2.py",
     ["already exists"]),
]  # fmt: skip


@pytest.mark.timeout(180)
@pytest.mark.parametrize("argv, tool, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_user_error_is_one_line_and_exit_2(ckpts, tmp_path, argv, tool, words):
    proc = subprocess.run(
        argv(ckpts, tmp_path), env=env(), cwd=ROOT, capture_output=True, text=True, timeout=150
    )
    err = proc.stderr
    assert proc.returncode == 2, f"exit {proc.returncode}\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    assert "usage:" not in err, err[-3000:]  # the line alone, not argparse's usage first
    lines = [x for x in err.splitlines() if "error:" in x]
    assert len(lines) == 1 and lines[0].startswith(f"{tool}: error: "), err[-3000:]
    assert err.rstrip().endswith(lines[0]), f"the error is not the last word:\n{err[-3000:]}"
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_a_bug_keeps_its_traceback(tmp_path):
    """Not a user error (a fault injected with a bad spec): the traceback stays, exit 1."""
    proc = subprocess.run(
        _train("train_sft.py", TINY, "sft.max_steps=1")({}, tmp_path),
        env=env(MEGARLHF_FAULT="nonsense"), cwd=ROOT, capture_output=True, text=True, timeout=150,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" in proc.stderr and "ValueError" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.timeout(240)
def test_an_error_on_one_rank_ends_every_rank(ckpts, tmp_path):
    """Rank 1's shard of a TP=2 --init-from is corrupt, rank 0's is fine: the job still ends."""
    rank_file(ckpts["tp2"], 1, 0).write_bytes(b"garbage")
    cmd = command("torchrun", 2) + ["--config", TINY, "--output-dir", str(tmp_path / "run"), *QUIET,
                                    "parallel.tp=2", "--init-from", str(ckpts["tp2"])]  # fmt: skip
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env(), cwd=ROOT, capture_output=True, text=True, timeout=180)
    elapsed = time.monotonic() - t0
    err = proc.stderr
    assert proc.returncode != 0, err[-3000:]
    mine = [x for x in err.splitlines() if x.startswith("train_sft.py: error: ")]
    assert any(x.startswith("train_sft.py: error: rank 1: ") and "tp01_pp00" in x for x in mine), (
        err[-4000:]
    )
    assert not any(x.startswith("train_sft.py: error: rank 0: CheckpointError") for x in mine)
    assert 'Traceback (most recent call last):\n  File "' + str(TOOLS) not in err, err[-4000:]
    assert elapsed < 120, elapsed
