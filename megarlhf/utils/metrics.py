"""Metric sinks of a training run: `<output_dir>/metrics.jsonl`, TensorBoard event files, and
the optional trackers (Weights & Biases, MLflow: megarlhf.utils.trackers).

`metrics.jsonl` holds one JSON object per optimizer step (`{"step": 12, "loss": ..., ...}`),
appended and flushed as each step ends, so a killed run keeps every finished step. On resume the
lines of steps after the checkpoint (steps the killed run finished but did not save) are dropped
first, so the file reads as one uninterrupted run. TensorBoard purges them too (`purge_step`);
the trackers cannot, and keep the killed run's copies (see trackers.py). Only one process
(rank 0) writes.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from megarlhf.utils.trackers import Trackers

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def truncate_after(path: str | Path, step: int) -> int:
    """Drop the records of steps > `step` (and any torn last line) from a metrics file.

    Returns:
        the number of records kept.
    """
    path = Path(path)
    if not path.exists():
        return 0
    kept = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if isinstance(rec, dict) and rec.get("step", math.inf) <= step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(k + "\n" for k in kept))
    os.replace(tmp, path)
    return len(kept)


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf
    return v


def scalars_of(rec: dict, prefix: str) -> dict[str, float]:
    """The numeric fields of a record as `prefix/key` scalars (what TensorBoard and trackers
    get; strings such as a "nan" written for JSON and booleans are left out)."""
    return {
        f"{prefix}/{k}": v
        for k, v in rec.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


class MetricsLogger:
    """Writes step records to metrics.jsonl and (optionally) TensorBoard and trackers.

    Args:
        output_dir: run directory.
        tensorboard: also write `<output_dir>/tensorboard/events.*`.
        resume_step: when resuming, drop records after this step first.
        trackers: W&B / MLflow runs to send every step's scalars to (None: none).
    """

    def __init__(
        self,
        output_dir: str | Path,
        tensorboard: bool = True,
        resume_step: int = -1,
        trackers: Trackers | None = None,
    ):
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / METRICS_FILE
        if resume_step >= 0:
            truncate_after(self.path, resume_step)
        elif self.path.exists():
            self.path.unlink()
        self._file = open(self.path, "a")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(
                str(self.dir / TENSORBOARD_DIR),
                purge_step=resume_step + 1 if resume_step >= 0 else None,
            )
        self.trackers = trackers

    def log(self, step: int, metrics: dict, prefix: str = "train") -> None:
        """Append one record {"step": step, **metrics}; scalars go to TensorBoard and the
        trackers as prefix/key."""
        rec = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(rec) + "\n")
        self._file.flush()
        scalars = scalars_of(rec, prefix)
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        if self.trackers is not None:
            self.trackers.log(step, scalars)

    def flush(self) -> None:
        self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self.trackers is not None:
            self.trackers.close()
