"""Atomic checkpoint directories: a checkpoint is either complete and loadable, or invisible.

Layout of a checkpoint root:

    <root>/step_000123/              a committed checkpoint (the ranks' files, any layout)
    <root>/step_000123/COMPLETE.json manifest written last: step, world size, every file's size,
                                     caller metadata
    <root>/step_000123/_ranks/rank_00000.json   what each rank wrote (name -> size)
    <root>/latest                    the committed checkpoint to resume from ("step_000123\\n")
    <root>/.tmp_step_000124/         a save in progress (or a crashed one): never loaded
    <root>/.trash_*/                 a checkpoint being deleted: never loaded

Save protocol (`save_checkpoint`), for any number of ranks sharing one filesystem:

1. rank 0 removes a stale temp dir of this step, creates `.tmp_step_N` and fsyncs the root;
   barrier.
2. every rank writes its files into the temp dir, fsyncs them (and their folders), then writes and
   fsyncs its marker `_ranks/rank_R.json` listing them; barrier.
3. rank 0 checks that all `world_size` markers exist and their files have the listed sizes,
   fsyncs everything, writes `COMPLETE.json` (temp file, fsync, rename), fsyncs the temp dir,
   renames it to `step_N` and fsyncs the root; then writes `latest` (temp file, fsync, rename,
   fsync root), removes leftovers of crashed saves and deletes checkpoints beyond keep-last-N
   (rename to `.trash_*`, then delete); barrier.

A crash of any rank before step 3's rename leaves only a temp dir (a dead rank also stops the
others at the barrier). A crash after it leaves a complete `step_N` while `latest` still names
the previous checkpoint, which stays complete; `latest` is authoritative, so the resume comes from
the previous checkpoint. `find_latest` returns the directory `latest` names if it is complete,
else the newest complete one (with a warning), else raises; a directory is complete only if
`COMPLETE.json` parses, matches its name and every listed file exists with its listed size.

This module imports neither torch nor numpy (the barrier helper imports torch when called), so it
is cheap in crash-test subprocesses.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
LATEST = "latest"
MANIFEST = "COMPLETE.json"
RANKS_DIR = "_ranks"
STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp_step_"
TRASH_PREFIX = ".trash_"
_STEP_RE = re.compile(r"^step_(\d+)$")


class CheckpointDirError(RuntimeError):
    """A checkpoint root or directory cannot be used; the message names the path."""


def step_dir_name(step: int) -> str:
    """`step_000123`; steps beyond 999999 simply get more digits."""
    return f"{STEP_PREFIX}{step:06d}"


def parse_step(name: str) -> int | None:
    """The step of a committed checkpoint directory name, else None."""
    m = _STEP_RE.match(name)
    return int(m.group(1)) if m else None


# ----------------------------------------------------------------------------- durable writes


def fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Make a directory's entries (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(path: str | Path, data: bytes) -> None:
    """Write `path` so that it holds either its old contents or all of `data`, durably."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _remove_tree(path: Path) -> None:
    """Delete a directory so that no crash can leave it half-deleted under its own name."""
    trash = path.with_name(f"{TRASH_PREFIX}{path.name}.{os.getpid()}.{time.time_ns()}")
    os.rename(path, trash)
    fsync_dir(path.parent)
    shutil.rmtree(trash)


def _files_under(folder: Path) -> dict[str, int]:
    """{relative posix path: size} of the regular files under `folder`."""
    out = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            p = Path(dirpath) / name
            out[p.relative_to(folder).as_posix()] = p.stat().st_size
    return out


# ----------------------------------------------------------------------------- saving


def _record_rank(tmp: Path, rank: int, files: Iterable[str | Path] | None) -> None:
    """fsync this rank's files and their folders, then write its marker (durably)."""
    sizes: dict[str, int] | None = None
    if files is not None:
        sizes = {}
        for f in files:
            p = Path(f) if Path(f).is_absolute() else tmp / f
            try:
                rel = p.resolve().relative_to(tmp.resolve()).as_posix()
            except ValueError:
                raise CheckpointDirError(f"rank {rank} wrote {p}, outside {tmp}") from None
            fsync_file(p)
            sizes[rel] = p.stat().st_size
        for folder in {(tmp / rel).parent for rel in sizes}:
            fsync_dir(folder)
    marker = tmp / RANKS_DIR / f"rank_{rank:05d}.json"
    marker.parent.mkdir(exist_ok=True)
    write_file_atomic(marker, json.dumps({"rank": rank, "files": sizes}).encode())


def _commit(root: Path, tmp: Path, step: int, world_size: int, meta: dict | None) -> Path:
    """Rank 0, after every rank's marker: verify, manifest, rename into place."""
    for r in range(world_size):
        marker = tmp / RANKS_DIR / f"rank_{r:05d}.json"
        if not marker.is_file():
            raise CheckpointDirError(f"{tmp}: rank {r} did not finish writing; not committing")
        for rel, size in (json.loads(marker.read_text())["files"] or {}).items():
            p = tmp / rel
            if not p.is_file() or p.stat().st_size != size:
                raise CheckpointDirError(f"{p}: rank {r} wrote {size} bytes, found otherwise")
    files = _files_under(tmp)
    for rel in files:  # files of ranks that did not list theirs; cheap for the others
        fsync_file(tmp / rel)
    for dirpath, _, _ in os.walk(tmp):
        fsync_dir(dirpath)
    manifest = {
        "format": FORMAT_VERSION,
        "step": step,
        "world_size": world_size,
        "files": files,
        "meta": meta or {},
    }
    write_file_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
    final = root / step_dir_name(step)
    if final.exists():  # left by a run that committed this step but died before `latest`
        logger.warning("%s exists (from an interrupted run); replacing it", final)
        _remove_tree(final)
    os.rename(tmp, final)
    fsync_dir(root)
    return final


def save_checkpoint(
    root: str | Path,
    step: int,
    write_fn: Callable[[Path], Iterable[str | Path] | None],
    *,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] | None = None,
    keep_last: int = 0,
    meta: dict | None = None,
) -> Path:
    """Save a checkpoint atomically (protocol in the module docstring); call on every rank.

    Args:
        root: checkpoint root, shared by all ranks.
        step: training step; the checkpoint becomes `<root>/step_{step:06d}`.
        write_fn: `write_fn(tmp_dir)` writes this rank's files into `tmp_dir` and returns their
            paths (absolute or relative to tmp_dir), which this rank then fsyncs. Returning None
            means "not known" (e.g. DeepSpeed's own writer): rank 0 fsyncs every file at commit,
            which is durable only where ranks share rank 0's page cache (one node).
        rank: this process's rank among the `world_size` writers.
        world_size: number of processes calling save_checkpoint for this step.
        barrier: blocks until all `world_size` processes reach it (e.g. `process_group_barrier()`);
            required when world_size > 1.
        keep_last: keep only the newest N checkpoints (0: keep all).
        meta: JSON-serializable metadata stored in the manifest (`read_manifest(dir)["meta"]`).

    Returns:
        the committed directory `<root>/step_{step:06d}` (on every rank).
    """
    if world_size > 1 and barrier is None:
        raise ValueError("save_checkpoint: a barrier is required when world_size > 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"save_checkpoint: rank={rank} is not in [0, world_size={world_size})")
    if step < 0:
        raise ValueError(f"save_checkpoint: step must be >= 0, got {step}")
    barrier = barrier or (lambda: None)
    # Absolute, so the temp dir handed to write_fn (and the paths it returns) cannot be mistaken
    # for paths relative to it when the caller gave a relative root.
    root = Path(root).absolute()
    tmp = root / f"{TMP_PREFIX}{step:06d}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            _remove_tree(tmp)
        tmp.mkdir()
        fsync_dir(root)
    barrier()
    _record_rank(tmp, rank, write_fn(tmp))
    barrier()
    final = root / step_dir_name(step)
    if rank == 0:
        _commit(root, tmp, step, world_size, meta)
        write_file_atomic(root / LATEST, (final.name + "\n").encode())
        _remove_leftovers(root)
        if keep_last > 0:
            prune_checkpoints(root, keep_last, newest=step)
    barrier()
    return final


def process_group_barrier(group=None) -> Callable[[], None]:
    """A barrier over a torch.distributed process group (default: the world)."""

    def barrier() -> None:
        import torch.distributed as dist

        dist.barrier(group=group)

    return barrier


def prune_checkpoints(root: str | Path, keep_last: int, newest: int) -> list[Path]:
    """Keep the `keep_last` newest complete checkpoints up to step `newest`; delete the rest.

    Complete checkpoints newer than `newest` belong to a run that was resumed from an earlier
    checkpoint, so they are deleted too. Incomplete `step_*` dirs (not made by this module) are
    left alone. Returns the deleted checkpoints.
    """
    root = Path(root)
    done = list_checkpoints(root)
    older = [p for s, p in done if s <= newest]
    doomed = older[: max(len(older) - keep_last, 0)] + [p for s, p in done if s > newest]
    for p in doomed:
        logger.info("deleting checkpoint %s (keep_last=%d)", p, keep_last)
        _remove_tree(p)
    return doomed


def _remove_leftovers(root: Path) -> None:
    """Delete temp dirs, trash and pointer temp files of crashed saves (none is in flight)."""
    for p in root.iterdir():
        if p.name.startswith((TRASH_PREFIX, TMP_PREFIX)):
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(f".{LATEST}.tmp."):
            p.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- finding


def incomplete_reason(ckpt_dir: str | Path) -> str | None:
    """Why `ckpt_dir` is not a complete checkpoint, or None if it is."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return "missing"
    try:
        manifest = json.loads((d / MANIFEST).read_text())
    except FileNotFoundError:
        return f"has no {MANIFEST} (torn: its save never finished)"
    except (OSError, ValueError) as e:
        return f"has an unreadable {MANIFEST} ({e})"
    if manifest.get("step") != parse_step(d.name):
        return f"{MANIFEST} says step {manifest.get('step')}, the name says otherwise"
    for rel, size in manifest.get("files", {}).items():
        p = d / rel
        if not p.is_file():
            return f"lacks {rel}"
        if p.stat().st_size != size:
            return f"has {rel} of {p.stat().st_size} bytes, {size} were written"
    return None


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root` as (step, path), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        step = parse_step(p.name)
        if step is not None and incomplete_reason(p) is None:
            out.append((step, p))
    return sorted(out)


def read_manifest(ckpt_dir: str | Path) -> dict:
    """The manifest of a complete checkpoint ({"step", "world_size", "files", "meta", ...})."""
    why = incomplete_reason(ckpt_dir)
    if why is not None:
        raise CheckpointDirError(f"{ckpt_dir}: not a complete checkpoint: it {why}")
    return json.loads((Path(ckpt_dir) / MANIFEST).read_text())


def find_latest(root: str | Path) -> Path | None:
    """The checkpoint to resume from, or None when `root` holds none (a fresh start).

    `<root>/latest` wins when it names a complete checkpoint; otherwise the newest complete one is
    used (with a warning); if `latest` exists but no checkpoint is complete, CheckpointDirError.
    Temp, trash and torn directories are never returned.
    """
    root = Path(root)
    done = list_checkpoints(root)
    pointer = root / LATEST
    if pointer.is_file():
        name = pointer.read_text().strip()
        why = incomplete_reason(root / name) if parse_step(name) is not None else "not a step"
        if why is None:
            return root / name
        if not done:
            raise CheckpointDirError(
                f"{pointer} names {name!r}, which {why}, and {root} holds no complete checkpoint"
            )
        logger.warning("%s names %r, which %s; using %s", pointer, name, why, done[-1][1])
        return done[-1][1]
    if done:
        logger.warning(
            "%s has no %s pointer; using the newest complete %s", root, LATEST, done[-1][1]
        )
        return done[-1][1]
    if root.is_dir():
        torn = sorted(
            p.name for p in root.iterdir() if p.name.startswith((STEP_PREFIX, TMP_PREFIX))
        )
        if torn:
            logger.warning("%s: ignoring incomplete checkpoint dirs %s", root, ", ".join(torn))
    return None
