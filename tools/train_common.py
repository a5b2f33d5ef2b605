"""What every training tool does the same way: arguments, launchers, threads, fault injection,
process-group set-up and teardown. `tools/train_sft.py` and `tools/train_rm.py` are thin
front-ends over `main`.

Launchers: one plain process (a gloo world of one is made, as DeepSpeed wants a process group),
`torchrun`, `deepspeed --num_gpus N` (which passes `--local_rank`), and multi-node deepspeed. The
environment decides: RANK set means a launcher started us.

This module imports no torch at import time: threads per rank must be set before torch starts its
thread pools.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megarlhf.utils.threads import set_threads_per_rank  # noqa: E402

FAULT_ENV = "MEGARLHF_FAULT"


def parse_args(prog: str, doc: str, example_config: str, argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", required=True, help=f"YAML run config (e.g. {example_config})")
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


def fault_hooks():
    """Fault injection for the resume tests: MEGARLHF_FAULT=step:N kills every rank with SIGKILL
    right after step N (and its checkpoint); save:N kills them inside the checkpoint of step N,
    after writing their files and before the commit."""
    from megarlhf.trainers.loop import TrainerHooks

    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return TrainerHooks()
    where, _, n = spec.partition(":")
    at = int(n)

    def die(step: int, record: dict | None = None) -> None:
        if step == at:
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    if where == "step":
        return TrainerHooks(on_step_end=die)
    if where == "save":
        return TrainerHooks(before_checkpoint_commit=die)
    raise ValueError(f"{FAULT_ENV}={spec!r}: expected step:N or save:N")


def main(
    args: argparse.Namespace,
    *,
    prog: str,
    config_cls: type,
    make_trainer: Callable,
) -> int:
    """Load the config, join (or make) the process group, train, tear down.

    Args:
        args: from `parse_args`.
        prog: the tool's name (error messages, logger).
        config_cls: the run config dataclass (SFTRunConfig, RMRunConfig, PPORunConfig).
        make_trainer: make_trainer(cfg, ps, output_dir, hooks) -> an object with .train().
    Returns:
        0, or 2 after a bad config, data or checkpoint (one line naming it, no traceback).
    """
    set_threads_per_rank()
    # DeepSpeed 0.19 calls torch.distributed APIs that torch 2.13 deprecates, once per bucket.
    warnings.filterwarnings(
        "ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning
    )
    import torch.distributed as dist

    from megarlhf.checkpoint.atomic import CheckpointDirError
    from megarlhf.checkpoint.training import ResumeError
    from megarlhf.config import ConfigError, load_config
    from megarlhf.data.sft import DataError
    from megarlhf.data.tokenizer import TokenizerError
    from megarlhf.parallel.state import build_parallel_state, init_distributed, shutdown_distributed
    from megarlhf.utils.logsetup import setup_logging

    user_errors = (ConfigError, DataError, TokenizerError, ResumeError, CheckpointDirError)
    logger = logging.getLogger(prog.removesuffix(".py"))
    overrides = list(args.overrides)
    if args.resume_from is not None:
        overrides.append(f"checkpoint.resume={args.resume_from}")
    elif args.resume:
        overrides.append("checkpoint.resume=latest")
    if args.init_from is not None:
        overrides.append(f"checkpoint.init_from={args.init_from}")
    try:
        # Refused here, before any process starts waiting on another.
        cfg = load_config(config_cls, args.config, overrides)
    except ValueError as e:  # ConfigError: the message names the key
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2

    store_dir = None
    if "RANK" in os.environ:
        rank, _ = init_distributed(cfg.loop.dist_timeout_s)
    else:
        # One plain process: DeepSpeed still wants a process group, so make a world of one.
        store_dir = tempfile.mkdtemp(prefix="megarlhf_train_")
        dist.init_process_group(
            "gloo", init_method=f"file://{store_dir}/store", rank=0, world_size=1
        )
        os.environ.setdefault("LOCAL_RANK", "0")
        rank = 0
    setup_logging(rank)
    try:
        ps = build_parallel_state(cfg.parallel.tp, cfg.parallel.pp)
        logger.info("%s; %d threads per rank", ps.describe(), int(os.environ["OMP_NUM_THREADS"]))
        trainer = make_trainer(cfg, ps, args.output_dir, fault_hooks())
        result = trainer.train()
        if rank == 0:
            logger.info("done: %s", result)
        # Every rank ends with a barrier and destroy_process_group (else one may abort at exit).
        # After an error there is no barrier: the launcher tears the other ranks down.
        shutdown_distributed()
    except user_errors as e:
        # Bad config, data or checkpoint: one line naming what is wrong, not a traceback.
        logger.error("%s: %s", type(e).__name__, e)
        return 2
    finally:
        if store_dir is not None:
            import shutil

            shutil.rmtree(store_dir, ignore_errors=True)
    return 0
