"""Measure what checkpoint checksums cost: xxh3 vs sha256 over a SmolLM2-135M-size save.

    python tools/bench_checksums.py                  # 134.5M parameters, fp32, ZeRO-1 Adam
    python tools/bench_checksums.py --params 10e6 --repeat 1 --dir /mnt/ckpt

Writes a synthetic set of files of the sizes a training save of that model writes (P parameters,
fp32): the safetensors shard (4P bytes), DeepSpeed's module file (4P) and its ZeRO optimizer file
(12P: fp32 master copy, exp_avg, exp_avg_sq), then hashes them the way a save does
(`checksums.file_checksum`, one thread, streaming in 8 MiB chunks) with each algorithm. The files
were just written, so they are in the page cache, as they are when a rank hashes what it wrote;
a load reading cold files from disk adds the disk's read time. Prints one line per algorithm
(best of --repeat) and removes the files.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from megarlhf.checkpoint import checksums

SMOLLM2_135M = 134_515_008
# (file, bytes per parameter) of one fp32 save at one rank with ZeRO-1 (see the docstring).
LAYOUT = (
    ("model/tp00_pp00.safetensors", 4),
    ("deepspeed/state/mp_rank_00_model_states.pt", 4),
    ("deepspeed/state/zero_pp_rank_0_mp_rank_00_optim_states.pt", 12),
)


def write_files(folder: Path, params: int) -> int:
    """Write the synthetic save under `folder` (random bytes, 64 MiB block repeated); its size."""
    block = os.urandom(64 << 20)
    total = 0
    for rel, per_param in LAYOUT:
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        left = params * per_param
        with open(path, "wb") as f:
            while left > 0:
                left -= f.write(block[: min(left, len(block))])
        total += params * per_param
    return total


def time_algorithm(folder: Path, algorithm: str, repeat: int) -> float:
    """Best wall time of hashing every file with `algorithm`."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for rel, _ in LAYOUT:
            checksums.file_checksum(folder / rel, algorithm)
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", type=float, default=SMOLLM2_135M, help="model parameters")
    p.add_argument("--repeat", type=int, default=3, help="timed passes per algorithm (best kept)")
    p.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir)")
    args = p.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="bench_checksums_", dir=args.dir))
    try:
        start = time.perf_counter()
        total = write_files(folder, int(args.params))
        written = time.perf_counter() - start
        print(
            f"{int(args.params):,} parameters: {len(LAYOUT)} files, {total / 2**30:.2f} GiB, "
            f"written in {written:.2f} s (page cache, no fsync)"
        )
        for algorithm in ("xxh3", "sha256"):
            if not checksums.can_compute(algorithm):
                print(f"{algorithm}: not available (pip install xxhash)")
                continue
            t = time_algorithm(folder, algorithm, args.repeat)
            print(f"{algorithm}: {t:.2f} s ({total / 2**30 / t:.2f} GiB/s, one thread)")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
