"""Measure the memory LoRA saves: peak RSS of SFT steps with full fine-tuning and with LoRA.

    python tools/bench_lora_memory.py                      # SmolLM2-135M, fp32, ranks 8 and 16
    python tools/bench_lora_memory.py --ranks 8 --micro-batch 1 --seq-len 256

Each configuration runs in its own fresh process, one after the other (peak RSS is per process):
it joins a one-rank gloo world, pays DeepSpeed's fixed costs on a tiny model (two steps: its
shared-memory op, accelerator set-up), takes the RSS as its baseline, then builds the model
(`configs/models/<--model>.yaml`, seeded random weights: no download) under `DeepSpeedModel`
(ZeRO 1, torch AdamW, as on CPU) and runs `--steps` SFT steps (forward, next-token loss through
the fused log-probs, backward, optimizer step) on a fixed random batch with left padding. As in
tests/perf/test_memory.py, glibc's mmap threshold is pinned at 64 KiB so RSS follows the live
tensors. Reported per configuration: `peak_rss` (the process's VmHWM), `model_peak` (VmHWM minus
the baseline: what the model, its optimizer and the step cost) and `predicted` (the planner's
`train_step_peak` for the same job, megarlhf/perf/memory.py), and `ratio_r<r>` = LoRA's
model_peak / full fine-tuning's. One JSON line on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROG = "bench_lora_memory.py"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="smollm2_135m", help="preset in configs/models/")
    p.add_argument("--ranks", default="8,16", help="LoRA ranks to measure, comma-separated")
    p.add_argument("--targets", default="qkv,proj,fc1,fc2", help="model.lora.target_modules")
    p.add_argument("--dtype", default="fp32", help="fp32 or bf16")
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--timeout", type=float, default=600, help="seconds per configuration")
    # Internal: run one configuration in this process (rank 0: full fine-tuning).
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def model_config(args: argparse.Namespace, rank: int):
    from megarlhf.config import ModelFileConfig, load_config

    path = ROOT / "configs" / "models" / f"{args.model}.yaml"
    overrides = [f"model.dtype={args.dtype}", f"model.max_seq_len={max(args.seq_len, 16)}"]
    if rank:
        overrides += [f"model.lora.rank={rank}", f"model.lora.target_modules=[{args.targets}]"]
    return load_config(ModelFileConfig, path, overrides).model


def predicted(cfg, args: argparse.Namespace) -> float:
    """The planner's peak of one SFT step of `cfg` (CPU: torch AdamW, ZeRO 1, no recompute)."""
    from megarlhf.perf.memory import PlanSpec, train_step_peak

    s = args.seq_len
    sp = PlanSpec(
        model=cfg, nodes=1, gpus_per_node=1, dp=1, zero=1, dtype=args.dtype, recompute=False,
        micro_batch=args.micro_batch, prompt_len=s // 2, response_len=s - s // 2,
        rollout_batch=args.micro_batch, optimizer="torch",
    )  # fmt: skip
    return train_step_peak(sp.shape("actor"), sp)


def sft_steps(cfg, b: int, s: int, steps: int) -> None:
    """`steps` optimizer steps of next-token loss on one fixed [b, s] batch."""
    import torch
    from megarlhf.kernels import logprobs_from_logits

    from megarlhf.config.optim import DeepSpeedConfig, OptimConfig
    from megarlhf.model.gpt import GPTModel
    from megarlhf.optim.deepspeed_model import DeepSpeedModel
    from megarlhf.parallel.state import build_parallel_state

    ps = build_parallel_state(1, 1)
    engine = DeepSpeedModel(
        GPTModel(cfg, ps, seed=1), ps, optim=OptimConfig(impl="torch"),
        deepspeed=DeepSpeedConfig(zero_stage=1), micro_batch_size=b, grad_accum=1,
        total_steps=10,
    )  # fmt: skip
    ids = torch.randint(0, cfg.vocab_size, (b, s), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(b, s, dtype=torch.long)
    mask[0, : s // 4] = 0  # left padding
    for _ in range(steps):
        engine.begin_step(1)
        out = engine(ids, attention_mask=mask)
        loss = -logprobs_from_logits(out[:, :-1], ids[:, 1:]).mean()
        engine.backward(loss)
        del out, loss  # as the trainers' schedule drops its outputs before the step
        engine.step()


def worker(args: argparse.Namespace) -> dict:
    import dataclasses
    import datetime
    import gc

    import torch
    import torch.distributed as dist

    from megarlhf.utils.rss import peak_rss_bytes, rss_bytes

    torch.set_num_threads(1)
    init = tempfile.mktemp(prefix="megarlhf_lora_mem_")
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=600))  # fmt: skip
    cfg = model_config(args, args.worker)
    tiny = dataclasses.replace(cfg, vocab_size=256, hidden_size=64, num_layers=1, num_heads=1,
                               num_kv_heads=1, ffn_hidden_size=128)  # fmt: skip
    sft_steps(tiny, 1, 16, 2)
    gc.collect()
    base = rss_bytes()
    t0 = time.perf_counter()
    sft_steps(cfg, args.micro_batch, args.seq_len, args.steps)
    peak = peak_rss_bytes()
    params = param_counts(cfg)
    return {
        "peak_rss": peak,
        "model_peak": peak - base,
        "predicted": predicted(cfg, args),
        "seconds": round(time.perf_counter() - t0, 1),
        **params,
    }


def param_counts(cfg) -> dict:
    """Parameter elements of the model, and those that train."""
    from megarlhf.perf.memory import local_param_count, local_trainable_count

    return {"params": local_param_count(cfg, 1, 1), "trained": local_trainable_count(cfg, 1, 1)}


def run_one(args: argparse.Namespace, argv: list[str], rank: int) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1", LOCAL_RANK="0")
    what = f"LoRA r={rank}" if rank else "full fine-tuning"
    print(f"{PROG}: {what} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(
        [sys.executable, __file__, *argv, "--worker", str(rank)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout,
    )  # fmt: skip
    if proc.returncode != 0:
        print(f"{PROG}: error: {what} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
        raise SystemExit(1)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{PROG}: {what}: model peak {out['model_peak'] / 2**20:.0f} MiB "
          f"(predicted {out['predicted'] / 2**20:.0f}) in {out['seconds']} s",
          file=sys.stderr, flush=True)  # fmt: skip
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(args)))
        return 0
    try:
        ranks = [int(r) for r in args.ranks.split(",") if r.strip()]
    except ValueError:
        print(f"{PROG}: error: --ranks: {args.ranks!r} is not a list of integers", file=sys.stderr)
        return 2
    if not ranks or any(r < 1 for r in ranks):
        print(f"{PROG}: error: --ranks: must be integers >= 1, got {args.ranks}", file=sys.stderr)
        return 2
    from megarlhf.config import ConfigError

    try:  # a bad --model / --targets / --dtype fails here, in one line
        model_config(args, ranks[0])
    except (ConfigError, FileNotFoundError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    result = {"model": args.model, "dtype": args.dtype, "micro_batch": args.micro_batch,
              "seq_len": args.seq_len, "steps": args.steps, "targets": args.targets}  # fmt: skip
    result["full"] = run_one(args, argv, 0)
    for r in ranks:
        result[f"lora_r{r}"] = run_one(args, argv, r)
        result[f"ratio_r{r}"] = round(result[f"lora_r{r}"]["model_peak"] / result["full"]
                                      ["model_peak"], 4)  # fmt: skip
        result[f"rss_ratio_r{r}"] = round(
            result[f"lora_r{r}"]["peak_rss"] / result["full"]["peak_rss"], 4
        )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
