"""Supervised fine-tuning (the first InstructGPT stage) under any launcher.

    # one plain process
    python tools/train_sft.py --config configs/sft_tiny.yaml --output-dir runs/sft
    # N ranks on this machine
    deepspeed --num_gpus N tools/train_sft.py --config configs/sft_tiny.yaml --output-dir runs/sft
    torchrun --nproc_per_node N tools/train_sft.py --config configs/sft_tiny.yaml --output-dir ...
    # several machines (hostfile lines: "worker-1 slots=8")
    deepspeed --num_nodes 4 --num_gpus 8 --hostfile HOSTS tools/train_sft.py --config ...

Dotted overrides follow the options: `optim.lr=1e-4 parallel.tp=2 deepspeed.zero_stage=2`.
A run resumes automatically from `<output-dir>/checkpoints` when it holds a complete checkpoint
(`checkpoint.resume=auto`); `--resume` insists on one, `--resume-from PATH` picks a step directory.
See docs/sft.md for the support matrix and the output layout.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
import warnings
from pathlib import Path

# Threads must be fixed before torch starts its pools; megarlhf.utils.threads imports torch
# only inside the call.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megarlhf.utils.threads import set_threads_per_rank  # noqa: E402

FAULT_ENV = "MEGARLHF_FAULT"

logger = logging.getLogger("train_sft")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="train_sft.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="YAML run config (e.g. configs/sft_tiny.yaml)")
    p.add_argument("--output-dir", required=True, help="metrics, TensorBoard, config, checkpoints")
    p.add_argument(
        "--resume",
        action="store_true",
        help="resume from the latest complete checkpoint of --output-dir, failing if there is "
        "none (without it a run resumes when it can: checkpoint.resume=auto)",
    )
    p.add_argument(
        "--resume-from",
        default=None,
        metavar="PATH",
        help="resume from this checkpoint directory (a step_N dir); sets checkpoint.resume",
    )
    p.add_argument(
        "--init-from",
        default=None,
        metavar="DIR",
        help="start from the weights of a megarlhf checkpoint (any TP/PP layout); sets "
        "checkpoint.init_from",
    )
    # The deepspeed launcher passes --local_rank; LOCAL_RANK in the environment says the same.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4")
    # Overrides may come before, between or after the options.
    return p.parse_intermixed_args(argv)


def _fault_hooks(rank: int):
    """Fault injection for the resume tests: MEGARLHF_FAULT=step:N kills every rank with SIGKILL
    right after step N (and its checkpoint); save:N kills them inside the checkpoint of step N,
    after writing their files and before the commit."""
    from megarlhf.trainers.sft import TrainerHooks

    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return TrainerHooks()
    where, _, n = spec.partition(":")
    at = int(n)

    def die(step: int) -> None:
        if step == at:
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    if where == "step":
        return TrainerHooks(on_step_end=die)
    if where == "save":
        return TrainerHooks(before_checkpoint_commit=die)
    raise ValueError(f"{FAULT_ENV}={spec!r}: expected step:N or save:N")


def main(argv=None) -> int:
    args = parse_args(argv)
    set_threads_per_rank()
    # DeepSpeed 0.19 calls torch.distributed APIs that torch 2.13 deprecates, once per bucket.
    warnings.filterwarnings(
        "ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning
    )
    import torch.distributed as dist

    from megarlhf.checkpoint.atomic import CheckpointDirError
    from megarlhf.config import ConfigError, load_config
    from megarlhf.data.sft import DataError
    from megarlhf.data.tokenizer import TokenizerError
    from megarlhf.parallel.state import build_parallel_state, init_distributed, shutdown_distributed
    from megarlhf.trainers.checkpointing import ResumeError
    from megarlhf.trainers.config import SFTRunConfig
    from megarlhf.trainers.engine import check_engine_supported
    from megarlhf.trainers.sft import SFTTrainer
    from megarlhf.utils.logsetup import setup_logging

    USER_ERRORS = (ConfigError, DataError, TokenizerError, ResumeError, CheckpointDirError)

    overrides = list(args.overrides)
    if args.resume_from is not None:
        overrides.append(f"checkpoint.resume={args.resume_from}")
    elif args.resume:
        overrides.append("checkpoint.resume=latest")
    if args.init_from is not None:
        overrides.append(f"checkpoint.init_from={args.init_from}")
    try:
        cfg = load_config(SFTRunConfig, args.config, overrides)
        check_engine_supported(cfg)  # refuse before any process starts waiting on another
    except ValueError as e:  # ConfigError: the message names the key
        print(f"train_sft.py: error: {e}", file=sys.stderr)
        return 2

    store_dir = None
    if "RANK" in os.environ:
        rank, _ = init_distributed(cfg.sft.dist_timeout_s)
    else:
        # One plain process: DeepSpeed still wants a process group, so make a world of one.
        store_dir = tempfile.mkdtemp(prefix="megarlhf_sft_")
        dist.init_process_group(
            "gloo", init_method=f"file://{store_dir}/store", rank=0, world_size=1
        )
        os.environ.setdefault("LOCAL_RANK", "0")
        rank = 0
    setup_logging(rank)
    try:
        ps = build_parallel_state(cfg.parallel.tp, cfg.parallel.pp)
        logger.info("%s; %d threads per rank", ps.describe(), int(os.environ["OMP_NUM_THREADS"]))
        trainer = SFTTrainer(cfg, ps, args.output_dir, hooks=_fault_hooks(rank))
        result = trainer.train()
        if rank == 0:
            logger.info("done: %s", result)
        # Every rank ends with a barrier and destroy_process_group (else one may abort at exit).
        # After an error there is no barrier: the launcher tears the other ranks down.
        shutdown_distributed()
    except USER_ERRORS as e:
        # Bad config, data or checkpoint: one line naming what is wrong, not a traceback.
        logger.error("%s: %s", type(e).__name__, e)
        return 2
    finally:
        if store_dir is not None:
            import shutil

            shutil.rmtree(store_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
