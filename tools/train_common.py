"""What every training tool does the same way: arguments, launchers, threads, fault injection,
process-group set-up and teardown, the output-directory lock, and how a run fails.
`tools/train_sft.py`, `tools/train_rm.py` and `tools/train_ppo.py` are thin front-ends over `main`.

Launchers: one plain process (a gloo world of one is made, as DeepSpeed wants a process group),
`torchrun`, `deepspeed --num_gpus N` (which passes `--local_rank`), and multi-node deepspeed. The
environment decides: RANK set means a launcher started us.

Failing (docs/failures.md): a user error (config, data, tokenizer, checkpoint, layout, a second
run on one output directory) is one line `<tool>: error: <message>` and exit 2; a collective that
timed out after `dist_timeout_s`, or lost its peer, is one line naming the group and exit 1; a bug
keeps its traceback. A worker started by a launcher dies with it (PR_SET_PDEATHSIG).

This module imports no torch at import time: threads per rank must be set before torch starts its
thread pools.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import re
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megarlhf.utils.threads import set_threads_per_rank  # noqa: E402

FAULT_ENV = "MEGARLHF_FAULT"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# What gloo and NCCL say when a collective waited out its timeout, or its peer went away.
TIMEOUT_MARKS = ("Timed out waiting", "timed out", "Application timeout caused pair closure",
                 "Watchdog caught collective operation timeout")  # fmt: skip
LOST_PEER_MARKS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


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


# ----------------------------------------------------------------------------- launcher death


def _set_pdeathsig(sig: int) -> bool:
    """Ask the kernel to send `sig` to this process when its parent exits (Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def watch_parent(parent: int, on_orphan: Callable[[], None], interval: float = 1.0) -> None:
    """Poll the parent pid; call `on_orphan` once it is no longer `parent` (it died)."""
    while os.getppid() == parent:
        time.sleep(interval)
    on_orphan()


def _die_orphaned() -> None:
    try:
        print(f"rank {os.environ.get('RANK', '?')}: the launcher died; exiting", file=sys.stderr)
    finally:
        os.kill(os.getpid(), signal.SIGKILL)


def exit_with_launcher(interval: float = 1.0) -> str:
    """Make this worker die when the launcher that started it dies, however it dies.

    Workers run in sessions of their own, so a SIGKILLed torchrun or deepspeed launcher would
    otherwise leave them training and committing checkpoints. On Linux the kernel sends SIGKILL
    on the parent's death (PR_SET_PDEATHSIG); elsewhere a daemon thread polls the parent pid.
    Only for processes a launcher started (RANK set): a plain run outlives its shell as usual.

    Returns:
        "pdeathsig", "watchdog" or "none" (what guards this process).
    """
    if "RANK" not in os.environ:
        return "none"
    parent = os.getppid()
    if _set_pdeathsig(signal.SIGKILL):
        if os.getppid() != parent:  # the launcher died before the kernel was told
            _die_orphaned()
        return "pdeathsig"
    threading.Thread(
        target=watch_parent, args=(parent, _die_orphaned, interval), daemon=True,
        name="launcher-watchdog",
    ).start()  # fmt: skip
    return "watchdog"


# ----------------------------------------------------------------------------- failures


def failing_group(tb):
    """The process group a failed collective ran on: the innermost frame of the traceback that
    holds a ProcessGroup in a local variable (torch's collectives keep it in `group`)."""
    import torch.distributed as dist

    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        groups = [v for v in frame.f_locals.values() if isinstance(v, dist.ProcessGroup)]
        if groups:
            return groups[0]
    return None


def _in_comm(tb) -> bool:
    """Whether the traceback runs through torch.distributed or DeepSpeed's communication code."""
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename.replace(os.sep, "/")
        if "/torch/distributed/" in name or "/deepspeed/comm/" in name:
            return True
        tb = tb.tb_next
    return False


def describe_group(group) -> str:
    """'the data-parallel group (ranks 0, 1)', from the description it was created with."""
    import torch.distributed as dist

    if group is None:
        return "a process group"
    desc = getattr(group, "group_desc", "") or ""
    if desc in ("", "undefined", "default_pg"):
        desc = "world group" if group == dist.group.WORLD else f"group {group.group_name}"
    try:
        ranks = ", ".join(str(r) for r in dist.get_process_group_ranks(group))
    except (RuntimeError, ValueError):
        return f"the {desc}"
    return f"the {desc} (ranks {ranks})"


def collective_failure(e: BaseException, timeout_s: float, timeout_key: str) -> str | None:
    """One line for a collective that timed out or lost its peer; None for anything else.

    Gloo's own message ("Timed out waiting 20000ms for recv operation") names neither the group
    nor the setting, so the group comes from the traceback and the setting from the config.
    """
    text = str(e)
    group = failing_group(e.__traceback__)
    if not isinstance(e, RuntimeError) or (group is None and not _in_comm(e.__traceback__)):
        return None  # not raised by a collective: a bug, keep its traceback
    # "[.../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting ..." -> "Timed out ..."
    said = re.sub(r"^\[[^\]]*\]\s*", "", text.strip().splitlines()[0] if text.strip() else "")
    where = describe_group(group)
    if any(m in text for m in TIMEOUT_MARKS):
        return (
            f"a collective on {where} timed out after {timeout_key} = {timeout_s:g} s: a peer "
            f"rank is hung (stopped, deadlocked) or gone (torch: {said[:200]})"
        )
    if any(m in text for m in LOST_PEER_MARKS):
        return (
            f"a collective on {where} lost its peer: another rank exited or died, and its own "
            f"error is the cause (torch: {said[:200]})"
        )
    return None


def report(prog: str, rank: int, world: int, message: str) -> None:
    """Print `<prog>: error: <message>` (with the rank when there are several) to stderr."""
    who = f"rank {rank}: " if world > 1 else ""
    print(f"{prog}: error: {who}{message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- main


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean the input is wrong, not the code: one line and exit 2."""
    from megarlhf.checkpoint.atomic import CheckpointDirError
    from megarlhf.checkpoint.errors import CheckpointError
    from megarlhf.checkpoint.training import ResumeError
    from megarlhf.config import ConfigError
    from megarlhf.data.sft import DataError
    from megarlhf.data.tokenizer import TokenizerError
    from megarlhf.utils.run_lock import RunLockError

    return (ConfigError, DataError, TokenizerError, ResumeError, CheckpointDirError,
            CheckpointError, RunLockError)  # fmt: skip


def _init_world(timeout_s: float) -> tuple[int, int, str | None]:
    """Join the launcher's world, or make a gloo world of one; (rank, world, store dir)."""
    import torch.distributed as dist

    from megarlhf.parallel.state import group_timeout, init_distributed

    if "RANK" in os.environ:
        rank, world = init_distributed(timeout_s)
        return rank, world, None
    # One plain process: DeepSpeed still wants a process group, so make a world of one.
    store_dir = tempfile.mkdtemp(prefix="megarlhf_train_")
    dist.init_process_group(
        "gloo", init_method=f"file://{store_dir}/store", rank=0, world_size=1,
        timeout=group_timeout(timeout_s),
    )  # fmt: skip
    os.environ.setdefault("LOCAL_RANK", "0")
    return 0, 1, store_dir


def _load(args: argparse.Namespace, config_cls: type):
    from megarlhf.config import load_config

    overrides = list(args.overrides)
    if args.resume_from is not None:
        overrides.append(f"checkpoint.resume={args.resume_from}")
    elif args.resume:
        overrides.append("checkpoint.resume=latest")
    if args.init_from is not None:
        overrides.append(f"checkpoint.init_from={args.init_from}")
    return load_config(config_cls, args.config, overrides)


def _train(cfg, args, rank: int, make_trainer: Callable, logger: logging.Logger) -> None:
    from megarlhf.parallel.state import build_parallel_state, shutdown_distributed
    from megarlhf.utils.run_lock import acquire_on_rank0

    ps = build_parallel_state(cfg.parallel.tp, cfg.parallel.pp, cfg.loop.dist_timeout_s)
    logger.info("%s; %d threads per rank", ps.describe(), int(os.environ["OMP_NUM_THREADS"]))
    # The lock comes before anything is written to the output directory, on every rank.
    lock = acquire_on_rank0(args.output_dir, rank)
    try:
        trainer = make_trainer(cfg, ps, args.output_dir, fault_hooks())
        result = trainer.train()
        if rank == 0:
            logger.info("done: %s", result)
        # Every rank ends with a barrier and destroy_process_group (else one may abort at exit).
        # After an error there is no barrier (`main` leaves the world or exits at once): the
        # launcher tears the other ranks down, or their collectives fail on closed connections.
        shutdown_distributed()
    finally:
        if lock is not None:
            lock.release()


def main(
    args: argparse.Namespace,
    *,
    prog: str,
    config_cls: type,
    make_trainer: Callable,
) -> int:
    """Load the config, join (or make) the process group, lock the output dir, train, tear down.

    Args:
        args: from `parse_args`.
        prog: the tool's name (error messages, logger).
        config_cls: the run config dataclass (SFTRunConfig, RMRunConfig, PPORunConfig).
        make_trainer: make_trainer(cfg, ps, output_dir, hooks) -> an object with .train().
    Returns:
        0; 2 after a bad config, data, checkpoint or layout, or a busy output directory (one line
        naming it, no traceback). After a collective timed out or lost its peer the process
        exits 1 at once (one line naming the group), without returning.
    """
    exit_with_launcher()
    set_threads_per_rank()
    # DeepSpeed 0.19 calls torch.distributed APIs that torch 2.13 deprecates, once per bucket.
    warnings.filterwarnings(
        "ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning
    )
    from megarlhf.config import ConfigError
    from megarlhf.utils.logsetup import setup_logging
    from megarlhf.utils.run_lock import RunLockError

    user_errors = _user_errors()
    logger = logging.getLogger(prog.removesuffix(".py"))
    rank = int(os.environ.get("RANK", "0"))
    try:
        # Refused here, before any process starts waiting on another.
        cfg = _load(args, config_cls)
    except ValueError as e:  # ConfigError: the message names the key
        if rank == 0:  # every rank reads the same file: one report
            report(prog, rank, 1, str(e))
        return 2
    timeout_s = cfg.loop.dist_timeout_s
    timeout_key = f"{prog.removeprefix('train_').removesuffix('.py')}.dist_timeout_s"
    rank, world, store_dir = _init_world(timeout_s)
    setup_logging(rank)
    try:
        _train(cfg, args, rank, make_trainer, logger)
    except user_errors as e:
        # Bad config, data or checkpoint: one line naming what is wrong, not a traceback. Every
        # rank sees a config, layout or lock error alike; rank 0 reports those.
        if rank == 0 or not isinstance(e, ConfigError | RunLockError):
            report(prog, rank, world, f"{type(e).__name__}: {e}")
        leave_world()
        return 2
    except RuntimeError as e:
        line = collective_failure(e, timeout_s, timeout_key)
        if line is None:
            raise  # a bug: its traceback
        report(prog, rank, world, line)
        _remove(store_dir)
        # The process group is broken: a normal teardown can block on it (gloo pairs, DeepSpeed's
        # and torch's exit hooks) and keep the launcher waiting (measured: 2.5 s), so leave now.
        sys.stdout.flush()
        os._exit(1)
    finally:
        _remove(store_dir)
    return 0


def leave_world() -> None:
    """Destroy the process group without a barrier (peers may be gone or elsewhere).

    A process that exits with a live gloo group can abort in its destructor ("terminate called
    without an active exception", SIGABRT), which turns a clean exit 2 into a crash report; the
    peers' next collective on the closed connections fails at once instead of waiting.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except (RuntimeError, ValueError):  # already broken: exit anyway
            pass


def _remove(store_dir: str | None) -> None:
    if store_dir is not None:
        import shutil

        shutil.rmtree(store_dir, ignore_errors=True)
