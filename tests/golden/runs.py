"""Golden runs: fixed commands of the three training tools whose metrics and final weights are
stored in this folder, so that a refactor can show it changed nothing (bit for bit).

    python -m tests.golden.runs            # (re)record every golden run into tests/golden/*.json
    python -m tests.golden.runs --check    # run them again and compare with the stored files

A record holds the run's `metrics.jsonl` without its timing fields (wall-clock times and rates
differ run to run) and, for every tensor of the final checkpoint's weights (the actor and, for
PPO, the critic), the SHA-256 of its bytes (bitwise identity) and its fp64 norm (to say by how
much two runs differ when they do). Runs are short variants of the shipped tiny configs, one plain
process with one thread, so the comparison is cheap enough for every CI run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
QUIET = ["logging.progress_bar=false", "logging.tensorboard=false", "logging.log_every=0"]
# name -> (tool, config, overrides); SHORT adds the step counts of the stored (CI) variants.
RUNS: dict[str, tuple[str, str, list[str]]] = {
    "sft": ("train_sft.py", "configs/sft_tiny.yaml", []),
    "rm": ("train_rm.py", "configs/rm_tiny.yaml", []),
    "ppo_ptx": ("train_ppo.py", "configs/ppo_tiny.yaml", []),
    "ppo": ("train_ppo.py", "configs/ppo_tiny.yaml", ["ppo.ptx_coef=0.0"]),
    "ppo_rloo": (
        "train_ppo.py",
        "configs/ppo_tiny.yaml",
        ["ppo.advantage_estimator=rloo", "ppo.samples_per_prompt=2", "ppo.rollout_batch_size=8"],
    ),
}
SHORT = {
    "sft": ["sft.max_steps=6"],
    "rm": ["rm.max_steps=6", "rm.eval_every=3"],
    "ppo_ptx": ["ppo.max_steps=3"],
    "ppo": ["ppo.max_steps=3"],
    "ppo_rloo": ["ppo.max_steps=3"],
}


def is_timing(key: str) -> bool:
    """Fields of a metrics record that measure wall-clock time (they differ run to run)."""
    return key.startswith("time_") or key in ("step_time_s", "tokens_per_s")


def overrides_of(name: str, full: bool = False) -> list[str]:
    return RUNS[name][2] + ([] if full else SHORT[name])


def command(name: str, out: Path, full: bool = False) -> list[str]:
    tool, config, _ = RUNS[name]
    return [
        sys.executable,
        str(ROOT / "tools" / tool),
        "--config",
        str(ROOT / config),
        "--output-dir",
        str(out),
        *QUIET,
        *overrides_of(name, full),
    ]


def launch(name: str, out: Path, full: bool = False) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("MEGARLHF_FAULT", None)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
    return subprocess.Popen(
        command(name, out, full), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def _weights(ckpt: Path) -> dict[str, dict]:
    import torch

    from megarlhf.checkpoint.model_shards import ModelShardsReader

    out = {}
    with ModelShardsReader(ckpt) as r:
        for name in r.names():
            t = r.full_tensor(name)
            raw = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            out[name] = {
                "sha256": hashlib.sha256(raw).hexdigest(),
                "norm": float(t.double().norm()),
                "dtype": str(t.dtype),
            }
    return out


def summarize(name: str, out: Path, full: bool = False) -> dict:
    """The comparable record of run `name`, finished in `out`."""
    from megarlhf.checkpoint import atomic

    lines = (out / "metrics.jsonl").read_text().splitlines()
    metrics = [{k: v for k, v in json.loads(x).items() if not is_timing(k)} for x in lines]
    ckpt = atomic.find_latest(out / "checkpoints")
    if ckpt is None:
        raise RuntimeError(f"{out}: no checkpoint")
    models = {"model": _weights(ckpt)}
    if (ckpt / "critic" / "model").is_dir():
        models["critic"] = _weights(ckpt / "critic")
    tool, config, _ = RUNS[name]
    cmd = [f"python tools/{tool} --config {config} --output-dir OUT", *overrides_of(name, full)]
    return {"command": " ".join(cmd), "metrics": metrics, **models}


def run_all(names: list[str], work: Path, full: bool = False) -> dict[str, dict]:
    """Run `names` two at a time into `work/<name>`; returns their records."""
    records = {}
    pending = list(names)
    while pending:
        batch, pending = pending[:2], pending[2:]
        procs = {n: launch(n, work / n, full) for n in batch}
        for n, p in procs.items():
            _, err = p.communicate(timeout=600)
            if p.returncode != 0:
                raise RuntimeError(f"golden run {n} failed (exit {p.returncode}):\n{err[-3000:]}")
            records[n] = summarize(n, work / n, full)
    return records


def golden_path(name: str, folder: Path = HERE) -> Path:
    return folder / f"{name}.json"


def main() -> int:
    import tempfile

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--check", action="store_true", help="compare instead of recording")
    p.add_argument("--full", action="store_true", help="the shipped configs' full step counts")
    p.add_argument("--dir", type=Path, default=HERE, help="where records are kept")
    p.add_argument("names", nargs="*", default=list(RUNS))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        records = run_all(args.names, Path(tmp), args.full)
    bad = 0
    for name, rec in records.items():
        if args.check:
            want = json.loads(golden_path(name, args.dir).read_text())
            same = want == rec
            bad += not same
            print(f"{name}: {'identical' if same else 'DIFFERENT'}")
        else:
            args.dir.mkdir(parents=True, exist_ok=True)
            path = golden_path(name, args.dir)
            path.write_text(json.dumps(rec, indent=1, sort_keys=True) + "\n")
            print(f"{name}: recorded {path}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
