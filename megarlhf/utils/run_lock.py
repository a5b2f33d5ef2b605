"""One live run per output directory: an advisory `flock` on `<output_dir>/.lock`.

Two runs writing one directory interleave their metrics and checkpoints and each resumes from the
other's files. Rank 0 of a training run takes an exclusive `fcntl.flock` on `<output_dir>/.lock`
before anything else is written there and holds it (an open file descriptor) until it exits;
the kernel drops the lock when the process dies, however it dies, so a run that was SIGKILLed
never blocks the next one. The holder writes its pid, host and start time into the file, and a
refused run names them.

Simplifications: the lock is advisory (only megarlhf runs respect it), and the file is left in
place after the run (deleting it would let a third run lock a fresh file while a second still
waits on the old one). On NFS, Linux emulates `flock` with byte-range locks, which the server
keeps; on file systems without locking the refusal cannot be made and the run goes ahead.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from pathlib import Path

LOCK_NAME = ".lock"


class RunLockError(RuntimeError):
    """The output directory is held by another live run, or cannot hold a lock (a user error)."""


class RunLock:
    """An exclusive lock on one output directory, held while this object's file is open."""

    def __init__(self, path: Path, fd: int):
        self.path, self._fd = path, fd

    def release(self) -> None:
        """Drop the lock (exit does the same)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def holder_of(path: Path) -> str:
    """'pid N on host H (since T)' from a lock file, or what is known of it."""
    try:
        info = json.loads(Path(path).read_text() or "{}")
        return f"pid {info['pid']} on host {info['host']} (since {info['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        # The holder locks first and writes second: its line may not be there yet.
        return "a process that has not written its pid yet"


def acquire(output_dir: str | Path) -> RunLock:
    """Take the output directory's lock, creating the directory; never waits.

    Returns:
        The held lock (release it, or exit).
    Raises:
        RunLockError: another live run holds it (the message names its pid and host), or the
            directory cannot be made.
    """
    path = Path(output_dir) / LOCK_NAME
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise RunLockError(f"--output-dir {output_dir}: cannot create {path} ({e})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunLockError(
            f"--output-dir {output_dir} is in use by another run: {holder_of(path)} holds "
            f"{path}; wait for it to end, stop it, or choose another --output-dir"
        ) from None
    except OSError:  # no locking on this file system: go ahead unprotected
        return RunLock(path, fd)
    since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    line = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since})
    os.ftruncate(fd, 0)
    os.pwrite(fd, (line + "\n").encode(), 0)
    return RunLock(path, fd)


def acquire_on_rank0(output_dir: str | Path, rank: int) -> RunLock | None:
    """Rank 0 takes the lock and tells every rank the outcome (collective over the world).

    Every rank must call this; with torch.distributed initialized the verdict is broadcast from
    rank 0, so a refused run ends on every rank instead of leaving some waiting.

    Returns:
        The lock on rank 0, None elsewhere.
    Raises:
        RunLockError: on every rank, when rank 0 was refused.
    """
    import torch.distributed as dist

    lock, refusal = None, None
    if rank == 0:
        try:
            lock = acquire(output_dir)
        except RunLockError as e:
            refusal = str(e)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        verdict = [refusal]
        dist.broadcast_object_list(verdict, src=0)
        refusal = verdict[0]
    if refusal is not None:
        raise RunLockError(refusal)
    return lock
