"""Atomic checkpoint directories: a checkpoint is either complete and loadable, or invisible.

Layout of a checkpoint root:

    <root>/step_000123/              a committed checkpoint (the ranks' files, any layout)
    <root>/step_000123/COMPLETE.json manifest written last: step, world size, every file's size
                                     and content checksum (`checksums.py`), caller metadata
    <root>/step_000123/_ranks/rank_00000.json   what each rank wrote (name -> size, checksum)
    <root>/latest                    the committed checkpoint to resume from ("step_000123\\n")
    <root>/.tmp_step_000124/         a save in progress (or a crashed one): never loaded
    <root>/.trash_*/                 a checkpoint being deleted: never loaded

Save protocol (`save_checkpoint`), for any number of ranks sharing one filesystem:

1. rank 0 removes leftovers of crashed saves (this step's stale temp dir included), checks the
   free space (below), creates `.tmp_step_N` and fsyncs the root; barrier. A rank that finds no
   temp dir after the barrier raises the error rank 0 met (too little space) too.
2. every rank writes its files into the temp dir, fsyncs them (and their folders), hashes them
   (streaming; they are in the page cache) and writes and fsyncs its marker `_ranks/rank_R.json`
   listing their sizes and checksums; barrier.
3. rank 0 checks that all `world_size` markers exist and their files have the listed sizes,
   hashes the files no rank listed (DeepSpeed's helper scripts, the markers), fsyncs everything,
   writes `COMPLETE.json` (temp file, fsync, rename), fsyncs the temp dir,
   renames it to `step_N` and fsyncs the root; then writes `latest` (temp file, fsync, rename,
   fsync root), removes leftovers of crashed saves and deletes checkpoints beyond keep-last-N
   (rename to `.trash_*`, then delete); barrier.

A crash of any rank before step 3's rename leaves only a temp dir (a dead rank also stops the
others at the barrier). A crash after it leaves a complete `step_N` while `latest` still names
the previous checkpoint, which stays complete; `latest` is authoritative, so the resume comes from
the previous checkpoint. `find_latest` returns the directory `latest` names if it is complete,
else the newest complete one (with a warning), else raises; a directory is complete only if
`COMPLETE.json` parses, matches its name and every listed file exists with its listed size.
Checksums are not read there (that would read every byte of every checkpoint): `verify_files`
checks the files a loader is about to read, `check_checkpoint` a whole directory.

Free space: before writing, rank 0 compares `shutil.disk_usage(root).free` with the expected size
(the newest complete checkpoint's size, else the caller's `expected_bytes`, plus `SPACE_MARGIN`)
and refuses with `checkpoint step_N: no space left on ROOT (needed ~X MiB, free Y MiB)`, a
CheckpointDirError, on every rank. The disk filling up during the write (ENOSPC, which torch
reports as a RuntimeError of its zip writer: recognised by errno, message, or a nearly full disk
after the failure) raises the same error on the rank that hit it, after removing the temp dir;
`latest` still names the previous checkpoint. A rank that wrote its files and waits at the barrier
is stopped by the launcher, as after any rank's failure (no data-carrying collective here: one
must never be mismatched with a collective that DeepSpeed's own save has in flight).

This module imports neither torch nor numpy (the barrier helper imports torch when called), so it
is cheap in crash-test subprocesses.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path

from megarlhf.checkpoint import checksums

# Re-exported: the tools and trainers import both from here.
from megarlhf.checkpoint.errors import CheckpointDirError, CorruptCheckpointError  # noqa: F401

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
LATEST = "latest"
MANIFEST = "COMPLETE.json"
RANKS_DIR = "_ranks"
STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp_step_"
TRASH_PREFIX = ".trash_"
_STEP_RE = re.compile(r"^step_(\d+)$")
# The space a save must find free: its expected size times (1 + SPACE_MARGIN) plus SPACE_SLACK
# (checkpoints of one run differ by a few bytes of JSON and pickle; small files are not counted
# in a first save's estimate).
SPACE_MARGIN = 0.02
SPACE_SLACK = 256 << 10
# Less free space than this after a failed write means the disk filled up.
FULL_BELOW = 1 << 20


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
    """fsync and hash this rank's files, fsync their folders, then write its marker (durably)."""
    sizes: dict[str, int] | None = None
    sums: dict[str, str] | None = None
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
        sums = checksums.checksum_files(tmp, sizes)
    marker = tmp / RANKS_DIR / f"rank_{rank:05d}.json"
    marker.parent.mkdir(exist_ok=True)
    record = {"rank": rank, "files": sizes, "checksums": sums}
    write_file_atomic(marker, json.dumps(record).encode())


def _commit(root: Path, tmp: Path, step: int, world_size: int, meta: dict | None) -> Path:
    """Rank 0, after every rank's marker: verify, manifest, rename into place."""
    sums: dict[str, str] = {}
    for r in range(world_size):
        marker = tmp / RANKS_DIR / f"rank_{r:05d}.json"
        if not marker.is_file():
            raise CheckpointDirError(f"{tmp}: rank {r} did not finish writing; not committing")
        record = json.loads(marker.read_text())
        for rel, size in (record["files"] or {}).items():
            p = tmp / rel
            if not p.is_file() or p.stat().st_size != size:
                raise CheckpointDirError(f"{p}: rank {r} wrote {size} bytes, found otherwise")
        sums.update(record.get("checksums") or {})
    files = _files_under(tmp)
    for rel in files:  # files of ranks that did not list theirs; cheap for the others
        fsync_file(tmp / rel)
    for dirpath, _, _ in os.walk(tmp):
        fsync_dir(dirpath)
    # Files no rank listed: DeepSpeed's helper scripts, the markers, a rank that returned None.
    sums.update(checksums.checksum_files(tmp, [rel for rel in files if rel not in sums]))
    manifest = {
        "format": FORMAT_VERSION,
        "step": step,
        "world_size": world_size,
        "files": files,
        "checksums": {rel: sums[rel] for rel in files},
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


# ----------------------------------------------------------------------------- free space


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def checkpoint_bytes(ckpt_dir: str | Path) -> int:
    """The total size of a complete checkpoint's files, from its manifest."""
    return sum(read_manifest(ckpt_dir)["files"].values())


def space_needed(root: str | Path, expected_bytes: int | None = None) -> int | None:
    """Bytes a new checkpoint under `root` should find free: the newest complete checkpoint's size
    (else `expected_bytes`, else unknown: None), plus the margin."""
    done = list_checkpoints(root)
    base = checkpoint_bytes(done[-1][1]) if done else expected_bytes
    if base is None:
        return None
    return int(base * (1 + SPACE_MARGIN)) + SPACE_SLACK


def _free_bytes(root: Path) -> int:
    """Free bytes on the filesystem of `root` (of its nearest existing ancestor)."""
    while not root.exists() and root != root.parent:
        root = root.parent
    return shutil.disk_usage(root).free


def read_latest(root: Path) -> str | None:
    """What `<root>/latest` names, or None (no pointer)."""
    try:
        return (root / LATEST).read_text().strip() or None
    except OSError:
        return None


def no_space_error(
    step: int, root: Path, needed: int | None, free: int, during_write: bool
) -> CheckpointDirError:
    """`checkpoint step_N: no space left on ROOT (needed ~X MiB, free Y MiB)...`."""
    if needed is not None and needed > free:
        need = f"~{_mib(needed)} MiB"
    else:  # the estimate fit, yet the disk filled up: more than what was free was needed
        need = f"more than {_mib(free)} MiB"
    msg = f"checkpoint {step_dir_name(step)}: no space left on {root} (needed {need}, free "
    msg += f"{_mib(free)} MiB)"
    if during_write:
        msg += "; the disk filled up while writing, the partial checkpoint was removed"
    prev = read_latest(root)
    msg += f"; {LATEST} still names {prev}" if prev else "; there is no earlier checkpoint"
    return CheckpointDirError(msg + ". Free some space (or lower checkpoint.keep_last) and resume")


def is_no_space(exc: BaseException, root: Path) -> bool:
    """Whether `exc` (raised while writing under `root`) means the disk is full: ENOSPC/EDQUOT
    anywhere in its chain, or a message saying so (torch's zip writer raises a bare
    RuntimeError), or less than FULL_BELOW bytes free now."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left" in str(e) or "os error 28" in str(e):
            return True
        e = e.__cause__ or e.__context__
    try:
        return _free_bytes(root) < FULL_BELOW
    except OSError:
        return False


def _release(exc: BaseException) -> None:
    """Drop the locals of the frames `exc` (and what it chains) went through: a writer that
    failed mid-file (torch's zip writer) still holds its file open there, and an unlinked file's
    space comes back only once it is closed."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        traceback.clear_frames(e.__traceback__)
        e = e.__cause__ or e.__context__


# ----------------------------------------------------------------------------- saving


def _begin(root: Path, tmp: Path, expected_bytes: int | None) -> None:
    """Rank 0: clear leftovers, check the free space, create the temp dir (not if short)."""
    root.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(root)  # a crashed save's temp dir holds space (this step's included)
    needed = space_needed(root, expected_bytes)
    if needed is not None and _free_bytes(root) < needed:
        return
    tmp.mkdir()
    fsync_dir(root)


def _not_started(step: int, root: Path, tmp: Path, expected_bytes) -> CheckpointDirError:
    """The error of a rank that found no temp dir after the first barrier."""
    needed, free = space_needed(root, expected_bytes), _free_bytes(root)
    if needed is None or free >= needed:
        return CheckpointDirError(f"checkpoint {step_dir_name(step)}: rank 0 did not create {tmp}")
    return no_space_error(step, root, needed, free, during_write=False)


def _write_rank(tmp: Path, rank: int, write_fn, step: int, root: Path, expected_bytes) -> None:
    """Run this rank's write_fn and record its files; on failure remove the temp dir (a full
    disk: raised as the no-space CheckpointDirError)."""
    try:
        _record_rank(tmp, rank, write_fn(tmp))
    except Exception as e:
        full = is_no_space(e, root)
        _release(e)
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            needed, free = space_needed(root, expected_bytes), _free_bytes(root)
            raise no_space_error(step, root, needed, free, during_write=True) from e
        raise


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
    expected_bytes: int | None = None,
) -> Path:
    """Save a checkpoint atomically (protocol in the module docstring); call on every rank.

    Args:
        root: checkpoint root, shared by all ranks.
        step: training step; the checkpoint becomes `<root>/step_{step:06d}`.
        write_fn: `write_fn(tmp_dir)` writes this rank's files into `tmp_dir` and returns their
            paths (absolute or relative to tmp_dir), which this rank then fsyncs and hashes.
            Returning None means "not known" (e.g. DeepSpeed's own writer): rank 0 fsyncs and
            hashes every such file at commit, which is durable only where ranks share rank 0's
            page cache (one node).
        rank: this process's rank among the `world_size` writers.
        world_size: number of processes calling save_checkpoint for this step.
        barrier: blocks until all `world_size` processes reach it (e.g. `process_group_barrier()`);
            required when world_size > 1.
        keep_last: keep only the newest N checkpoints (0: keep all).
        meta: JSON-serializable metadata stored in the manifest (`read_manifest(dir)["meta"]`).
        expected_bytes: the size of the whole checkpoint (all ranks), for the free-space check of
            a first save (later saves use the previous checkpoint's size); None: not checked.

    Returns:
        the committed directory `<root>/step_{step:06d}` (on every rank).

    Raises:
        CheckpointDirError: too little free space (before writing, on every rank), the disk
            filled up while this rank wrote, or a rank's files are missing at commit.
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
    begin_error = None
    if rank == 0:
        try:
            _begin(root, tmp, expected_bytes)
        except Exception as e:  # raised after the barrier, so no rank waits for rank 0
            begin_error = e
    barrier()
    if not tmp.is_dir():
        if begin_error is not None:
            raise begin_error
        raise _not_started(step, root, tmp, expected_bytes)
    _write_rank(tmp, rank, write_fn, step, root, expected_bytes)
    barrier()
    final = root / step_dir_name(step)
    if rank == 0:
        _commit_and_point(root, tmp, step, world_size, meta, expected_bytes)
        _remove_leftovers(root)
        if keep_last > 0:
            prune_checkpoints(root, keep_last, newest=step)
    barrier()
    return final


def _commit_and_point(root: Path, tmp: Path, step: int, world_size: int, meta, expected) -> None:
    """Rank 0: commit the temp dir and point `latest` at it; on failure remove what this save
    left (the previous checkpoint and `latest` untouched)."""
    final = root / step_dir_name(step)
    try:
        _commit(root, tmp, step, world_size, meta)
        write_file_atomic(root / LATEST, (final.name + "\n").encode())
    except Exception as e:
        full = is_no_space(e, root)
        _release(e)
        shutil.rmtree(tmp, ignore_errors=True)
        if final.is_dir() and read_latest(root) != final.name:
            shutil.rmtree(final, ignore_errors=True)
        if full:
            needed, free = space_needed(root, expected), _free_bytes(root)
            raise no_space_error(step, root, needed, free, during_write=True) from e
        raise


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


# ----------------------------------------------------------------------------- verifying


def verify_files(ckpt_dir: str | Path, rels: Iterable[str], hint: str | None = None) -> None:
    """Check the content of the files `rels` (relative to a complete checkpoint) against the
    checksums its manifest records, before a loader reads them.

    A checkpoint saved before checksums existed has none: logged at debug level, not an error.

    Raises:
        CorruptCheckpointError: the first file whose content differs (the message names it).
        CheckpointDirError: `ckpt_dir` is not a complete checkpoint.
    """
    ckpt_dir = Path(ckpt_dir)
    recorded = read_manifest(ckpt_dir).get("checksums")
    if recorded is None:
        logger.debug("%s: no checksums recorded (saved before checksums); not verified", ckpt_dir)
        return
    for rel in rels:
        checksums.verify_file(ckpt_dir / rel, recorded.get(rel), hint or checksums.LOAD_HINT)


def check_checkpoint(ckpt_dir: str | Path) -> checksums.Report:
    """Every problem of a checkpoint directory, without loading anything: a missing or unreadable
    manifest, a wrong step, and for every listed file: missing, another size, another content."""
    d = Path(ckpt_dir)
    report = checksums.Report()
    try:
        manifest = json.loads((d / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        report.problems.append(f"{d}: has no {MANIFEST} (torn: its save never finished)")
        return report
    except (OSError, ValueError, KeyError, TypeError) as e:
        report.problems.append(f"{d / MANIFEST}: unreadable ({e})")
        return report
    if parse_step(d.name) is not None and manifest.get("step") != parse_step(d.name):
        report.problems.append(f"{d / MANIFEST}: says step {manifest.get('step')}, not {d.name}")
    sums = manifest.get("checksums")
    if sums is None:
        report.notes.append(f"{d}: no checksums recorded (saved before checksums): sizes only")
        sums = {}
    listed = {rel: {"size": size, "checksum": sums.get(rel)} for rel, size in files.items()}
    report.add(d, listed)
    return report
