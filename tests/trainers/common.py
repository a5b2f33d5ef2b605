"""Helpers for the trainer tests: launching tools/train_sft.py, reading what a run wrote."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from megarlhf.checkpoint import atomic
from megarlhf.checkpoint.model_shards import ModelShardsReader

ROOT = Path(__file__).resolve().parents[2]
TOOL = str(ROOT / "tools" / "train_sft.py")
TINY = str(ROOT / "configs" / "sft_tiny.yaml")
BIN = Path(sys.executable).parent
# Every test process shares one build of DeepSpeed's shared-memory op (and megarlhf's C++ ops).
EXT_DIR = os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
# Quiet, fast settings shared by every launched run.
QUIET = ["logging.progress_bar=false", "logging.tensorboard=false", "logging.log_every=0"]


def env(**extra) -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", TORCH_EXTENSIONS_DIR=EXT_DIR, PYTHONPATH=str(ROOT))
    e.pop("MEGARLHF_FAULT", None)
    e.update(extra)
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(launcher: str, nproc: int = 1) -> list[str]:
    """The launcher prefix: plain | torchrun | deepspeed."""
    if launcher == "plain":
        return [sys.executable, TOOL]
    port = str(free_port())
    if launcher == "torchrun":
        return [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", port, TOOL]
    if launcher == "deepspeed":
        return [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", port, TOOL]
    raise ValueError(launcher)


def train(
    out: Path,
    overrides: list[str],
    launcher: str = "plain",
    nproc: int = 1,
    fault: str | None = None,
    timeout: float = 240,
    extra_args: list[str] | None = None,
) -> subprocess.CompletedProcess:
    cmd = command(launcher, nproc) + ["--config", TINY, "--output-dir", str(out), *QUIET]
    cmd += extra_args or []
    extra = {"MEGARLHF_FAULT": fault} if fault else {}
    return subprocess.run(
        cmd + overrides,
        env=env(**extra),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-4000:]}"
    return proc


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    """Full (unsharded) weights of the latest checkpoint of a run, at any layout."""
    ckpt = atomic.find_latest(Path(out) / "checkpoints")
    assert ckpt is not None, f"{out}: no checkpoint"
    with ModelShardsReader(ckpt) as r:
        return {name: r.full_tensor(name) for name in r.names()}


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"


def kill_when(proc: subprocess.Popen, out: Path, step: int, timeout: float = 180) -> int:
    """SIGKILL a launched run (its whole process group) once metrics.jsonl reaches `step`.

    Returns the last step the metrics showed when the kill was sent.
    """
    path = Path(out) / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    seen = 0
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists():
            lines = path.read_text().splitlines()
            seen = len(lines)
            if seen >= step:
                break
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    return seen


def first_batch_loss(weights: dict[str, torch.Tensor], overrides: list[str]) -> float:
    """Token-mean loss of full `weights` on the run's first global batch, in plain torch."""
    from megarlhf.config import load_config
    from megarlhf.config.sft import SFTRunConfig
    from megarlhf.data.loader import build_sft_loader
    from megarlhf.data.tokenizer import load_tokenizer
    from megarlhf.model.gpt import GPTModel
    from megarlhf.parallel.state import single_process_state

    cfg = load_config(SFTRunConfig, TINY, overrides)
    cfg.data.train_files = [str(ROOT / f) for f in cfg.data.train_files]
    tok = load_tokenizer(ROOT / cfg.data.text.tokenizer)
    rows = cfg.sft.passes.global_batch_size
    loader = build_sft_loader(cfg.data, tok, micro_batch_size=rows, grad_accum=1, dp_rank=0,
                              dp_size=1)  # fmt: skip
    model = GPTModel(cfg.model, single_process_state(), seed=0)
    model.load_state_dict(weights, strict=True)
    (mb,) = loader.next_step()
    with torch.no_grad():
        logits = model(mb["input_ids"], position_ids=mb["position_ids"],
                       segment_ids=mb["segment_ids"])  # fmt: skip
        v = cfg.model.vocab_size
        return torch.nn.functional.cross_entropy(
            logits[..., :v].flatten(0, 1), mb["labels"].flatten(), ignore_index=-100
        ).item()
