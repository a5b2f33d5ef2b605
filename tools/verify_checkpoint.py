"""Check a checkpoint's files against what was recorded when it was written, loading no model.

    python tools/verify_checkpoint.py output/sft/checkpoints/step_000120   # one step directory
    python tools/verify_checkpoint.py output/sft/checkpoints   # the checkpoint `latest` names
    python tools/verify_checkpoint.py output/sft               # a run's output dir: the same
    python tools/verify_checkpoint.py ckpt/smollm2-135m        # a model-shard dir (convert_hf.py)

For a training checkpoint (`step_N`, atomic.py): COMPLETE.json present and readable, and every
file it lists present, of its listed size and checksum. For a model-shard directory (holding
`model/meta.json`): meta.json readable, every rank file its layout implies present, every file
the sidecars `model/checksums*.json` list of its size and checksum. A checkpoint written before
checksums existed is checked for presence and sizes only (a note says so).

Prints one line per problem, then a summary. Exit status: 0 clean, 1 corrupt (a problem found),
2 bad argument (not a checkpoint of either kind).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from megarlhf.checkpoint import atomic, checksums


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="verify_checkpoint.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dir", type=Path, help="a step_N dir, a checkpoints root, a run's output dir, "
                   "or a model-shard dir")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="print problems and the summary only")
    return p


def _step_of_root(root: Path) -> Path | None:
    """The step dir a checkpoints root resumes from: what `latest` names (even a torn one, whose
    problems are then reported), else the newest `step_*`; None when there is neither."""
    name = atomic.read_latest(root)
    if name:
        return root / name
    steps = sorted(
        (step, p) for p in root.iterdir() if (step := atomic.parse_step(p.name)) is not None
    )
    return steps[-1][1] if steps else None


def resolve(path: Path) -> tuple[str, Path] | None:
    """("step", dir) or ("shards", dir) for what `path` designates, else None."""
    if not path.is_dir():
        return None
    if (path / atomic.MANIFEST).is_file() or atomic.parse_step(path.name) is not None:
        return "step", path
    if (path / "model" / "meta.json").is_file():
        return "shards", path
    for root in (path, path / "checkpoints"):
        if root.is_dir():
            step = _step_of_root(root)
            if step is not None:
                return "step", step
    return None


def check(kind: str, path: Path) -> checksums.Report:
    if kind == "step":
        return atomic.check_checkpoint(path)
    from megarlhf.checkpoint.model_shards import check_model_shards  # imports torch

    return check_model_shards(path)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    found = resolve(args.dir)
    if found is None:
        print(
            f"verify_checkpoint.py: error: {args.dir} is not a checkpoint: no {atomic.MANIFEST}, "
            "no model/meta.json, no step_N under it or under its checkpoints/",
            file=sys.stderr,
        )
        return 2
    kind, path = found
    start = time.perf_counter()
    report = check(kind, path)
    seconds = time.perf_counter() - start
    for line in report.problems:
        print(line)
    if not args.quiet:
        for line in report.notes:
            print(f"note: {line}")
    size = f"{report.files} files, {report.bytes / 2**20:.1f} MiB in {seconds:.2f} s"
    if report.problems:
        print(f"{path}: CORRUPT: {len(report.problems)} problem(s); checked {size}")
        return 1
    print(f"{path}: OK: checked {size} ({checksums.ALGORITHM} where recorded)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
