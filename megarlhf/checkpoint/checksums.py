"""Content checksums of checkpoint files: recorded when written, checked before they are read.

A checksum is a string `"<algorithm>:<hex digest>"`, so a record says how it was made:
`xxh3:...` (xxHash's XXH3-64, when the `xxhash` package is importable; it is a dependency of
`datasets` and pinned in requirements.txt) or `sha256:...` (hashlib, the fallback). Files are
hashed streaming, `CHUNK` bytes at a time into one reused buffer, so memory stays flat whatever
the file's size. A record made with an algorithm this process cannot compute (xxh3 without
`xxhash`) is skipped with a warning rather than failing the load.

Who records what:

* atomic checkpoints (`atomic.save_checkpoint`): each rank hashes the files it wrote into its
  marker, and `COMPLETE.json` holds every file's checksum under `"checksums"`;
* model-shard directories outside an atomic checkpoint (converted models): `model/checksums.json`
  (`model_shards.ModelShardsWriter`), or `model/checksums.tpXX_ppYY.json` per rank file
  (`model_shards.save_model_shard` called on its own), in the `SIDECAR_FORMAT` below.

This module imports neither torch nor numpy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from megarlhf.checkpoint.errors import CorruptCheckpointError

try:  # XXH3 runs at memory speed; sha256 is the portable fallback.
    import xxhash
except ImportError:  # pragma: no cover - xxhash is in requirements.txt
    xxhash = None

logger = logging.getLogger(__name__)

# 8 MiB: large enough that the per-call overhead is noise, small enough to stay in L2/L3.
CHUNK = 8 << 20
ALGORITHM = "xxh3" if xxhash is not None else "sha256"
SIDECAR_FORMAT = 1
# Model-shard sidecars: `model/checksums.json` (a whole directory) or `model/checksums.<rank>.json`
# (one rank file), each {"format": 1, "files": {name in model/: {"size": n, "checksum": "..."}}}.
SIDECAR_GLOB = "checksums*.json"
SIDECAR = "checksums.json"
# What a mismatch message ends with: what to do (a loader's adds how to check the rest).
DEFAULT_HINT = "restore it from a good copy or use another checkpoint"
LOAD_HINT = DEFAULT_HINT + " (tools/verify_checkpoint.py DIR checks a whole directory)"


def _hasher(algorithm: str):
    if algorithm == "xxh3" and xxhash is not None:
        return xxhash.xxh3_64()
    if algorithm == "sha256":
        return hashlib.sha256()
    return None


def can_compute(algorithm: str) -> bool:
    """Whether this process can compute checksums made with `algorithm`."""
    return _hasher(algorithm) is not None


def file_checksum(path: str | Path, algorithm: str | None = None) -> str:
    """`"<algorithm>:<hex>"` of the file's bytes (default algorithm: `ALGORITHM`), read `CHUNK`
    bytes at a time."""
    algorithm = algorithm or ALGORITHM
    h = _hasher(algorithm)
    if h is None:
        raise ValueError(f"checksum algorithm {algorithm!r} is not available here")
    buf = bytearray(min(CHUNK, max(os.path.getsize(path), 1)))
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return f"{algorithm}:{h.hexdigest()}"


def checksum_files(base: Path, rels: Iterable[str]) -> dict[str, str]:
    """{rel: checksum} of the files `base / rel`."""
    return {rel: file_checksum(base / rel) for rel in rels}


def mismatch(path: str | Path, recorded: str, hint: str = DEFAULT_HINT) -> str | None:
    """None when the file at `path` has the checksum `recorded`, else the problem (naming it).

    A record of an algorithm this process cannot compute counts as a match (with a warning).
    """
    algorithm = recorded.partition(":")[0]
    if not can_compute(algorithm):
        logger.warning("%s: cannot check its %s checksum here (install xxhash)", path, algorithm)
        return None
    found = file_checksum(path, algorithm)
    if found == recorded:
        return None
    return (
        f"{path}: checksum mismatch (recorded {recorded}, found {found}): the file is corrupt; "
        + hint
    )


def verify_file(path: str | Path, recorded: str | None, hint: str = LOAD_HINT) -> None:
    """Raise CorruptCheckpointError when `path` does not match `recorded` (None: not recorded,
    a file written before checksums existed; logged at debug level)."""
    if recorded is None:
        logger.debug("%s: no checksum recorded (written before checksums); not verified", path)
        return
    problem = mismatch(path, recorded, hint)
    if problem is not None:
        raise CorruptCheckpointError(problem)


# ----------------------------------------------------------------------------- sidecars


def sidecar_entries(base: Path, names: Iterable[str]) -> dict[str, dict]:
    """{name: {"size", "checksum"}} of the files `base / name`, for a sidecar."""
    return {
        n: {"size": (base / n).stat().st_size, "checksum": file_checksum(base / n)} for n in names
    }


def write_sidecar(path: Path, entries: Mapping[str, dict]) -> Path:
    """Write a sidecar (temp file, then rename: a reader sees the old one or the new one)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"format": SIDECAR_FORMAT, "files": dict(entries)}, indent=1) + "\n")
    tmp.replace(path)
    return path


def read_sidecars(folder: Path) -> tuple[dict[str, dict], list[str]]:
    """The entries of every sidecar in `folder` merged ({name: {"size", "checksum"}}), and the
    problems met (an unreadable sidecar is a problem, not an exception)."""
    entries: dict[str, dict] = {}
    problems = []
    for path in sorted(folder.glob(SIDECAR_GLOB)):
        try:
            raw = json.loads(path.read_text())
            files = raw["files"]
            if raw.get("format") != SIDECAR_FORMAT or not isinstance(files, dict):
                raise ValueError(f"format {raw.get('format')!r}")
        except (OSError, ValueError, KeyError, TypeError) as e:
            problems.append(f"{path}: unreadable checksum file ({e})")
            continue
        entries.update(files)
    return entries, problems


@dataclass
class Report:
    """What checking a directory found: problems (corruption), notes (e.g. nothing recorded),
    and how many files and bytes were checked."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    files: int = 0
    bytes: int = 0

    def add(self, base: Path, listed: Mapping[str, dict]) -> None:
        """Check the files `base / name` against {name: {"size", "checksum"}} (either may be
        None: not recorded): missing, another size, another content."""
        for name, rec in listed.items():
            p = base / name
            if not p.is_file():
                self.problems.append(f"{p}: missing")
                continue
            size = p.stat().st_size
            self.files += 1
            self.bytes += size
            if rec.get("size") is not None and size != rec["size"]:
                self.problems.append(f"{p}: {size} bytes, {rec['size']} were written")
            elif rec.get("checksum"):
                problem = mismatch(p, rec["checksum"])
                if problem is not None:
                    self.problems.append(problem)
