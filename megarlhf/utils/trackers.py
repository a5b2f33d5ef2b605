"""Optional experiment trackers beside metrics.jsonl and TensorBoard: Weights & Biases
(`logging.wandb`, `pip install megarlhf[wandb]`) and MLflow (`logging.mlflow`,
`pip install megarlhf[mlflow]`).

Each tracker run gets the run's config (W&B: the nested config; MLflow: flattened `section.key`
params) and every step's scalars under the names TensorBoard uses (`train/loss`, ...) with the
step given explicitly. Only rank 0 opens them (the process that owns the MetricsLogger).

Resume: `<output_dir>/trackers.json` keeps each tracker's run id; a resumed training run reopens
the same tracker runs (W&B `resume="allow"`, the same MLflow run) and logs the steps after its
checkpoint. The steps the killed process logged after that checkpoint are trained again.
metrics.jsonl drops the killed process's copies; a tracker cannot delete a logged point, so:

- MLflow (each log call is a committed write): on reopening, the last step the run holds is read
  back, and steps up to it are not sent again. The run keeps the killed process's copies (a
  resume repeats them bit for bit, timing fields aside: step_time_s, tokens_per_s differ).
- W&B: every step after the checkpoint is sent again, and W&B keeps the copy it already has (a
  resumed W&B run starts at its last step + 1 and ignores lower steps: skipped here before
  sending). Sending again matters: W&B's service buffers what it writes (the offline `.wandb` file
  is flushed about every 15 s, uploads are batched too), so a SIGKILLed process loses its last
  seconds of W&B data; the resumed run refills the steps after its checkpoint, while buffered
  steps up to the checkpoint stay lost. The config is sent at every start (the same values
  merge); MLflow logs its params once, when the run is created (it refuses changed values).

W&B offline (`WANDB_MODE=offline`): each process writes its own `<output_dir>/wandb/offline-run-*`
folder, all with the same run id; `wandb sync` uploads them in start order into that one run.
MLflow's default store is a SQLite file, `<output_dir>/mlflow.db` (MLflow 3 refuses the old
`./mlruns` file store unless MLFLOW_ALLOW_FILE_STORE=true); `logging.mlflow_tracking_uri` points
it anywhere else (a tracking server, another database, `file:` with that variable set).
"""

from __future__ import annotations

import json
import logging
import os
import time
from abc import ABC, abstractmethod
from pathlib import Path

logger = logging.getLogger(__name__)

TRACKERS_FILE = "trackers.json"
# MLflow limits: params per log_batch call, characters per param value.
_MLFLOW_BATCH, _MLFLOW_PARAM_CHARS = 100, 6000


class Tracker(ABC):
    """One tracker run: scalars by step, then close. Built as `cls(output_dir, cfg, run_config,
    stored)`: the training run's folder, the `logging:` section, the whole run config as a plain
    dict, and this tracker's trackers.json entry when resuming (else None)."""

    name: str
    # Id of the tracker run (kept in trackers.json).
    run_id: str

    @abstractmethod
    def log(self, step: int, scalars: dict[str, float]) -> None:
        """Send one step's scalars (a step the tracker run already holds may be skipped)."""

    @abstractmethod
    def close(self) -> None:
        """Mark the tracker run finished."""


class WandbTracker(Tracker):
    """A Weights & Biases run (online, or offline files under `<output_dir>/wandb`)."""

    name = "wandb"

    def __init__(self, output_dir: Path, cfg, run_config: dict, stored: dict | None):
        import wandb

        self.run = wandb.init(
            project=cfg.wandb_project,
            entity=cfg.wandb_entity or None,
            name=cfg.wandb_run_name or output_dir.name,
            # None: W&B makes a new id (read back below).
            id=cfg.wandb_run_id or (stored or {}).get("run_id") or None,
            resume="allow",
            dir=str(output_dir),
            config=run_config,
        )
        self.run_id = self.run.id
        # A resumed online run starts after the last step W&B holds (0 offline and when fresh).
        self.first_step = self.run.step

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if step < self.first_step:
            return  # W&B holds this step already and would ignore it, with a warning
        # commit: hand the step to W&B's service now rather than when the next step starts.
        self.run.log(scalars, step=step, commit=True)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker(Tracker):
    """An MLflow run, through `MlflowClient` (no process-global active run)."""

    name = "mlflow"

    def __init__(self, output_dir: Path, cfg, run_config: dict, stored: dict | None):
        from mlflow.tracking import MlflowClient

        uri = cfg.mlflow_tracking_uri or f"sqlite:///{output_dir.absolute() / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=uri)
        self.last_step = -1
        run = self._get_run((stored or {}).get("run_id"), uri)
        if run is not None:
            self.run_id = run.info.run_id
            self.last_step = self._last_logged_step(run)
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name(cfg.mlflow_experiment)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else self.client.create_experiment(cfg.mlflow_experiment)
        )
        run = self.client.create_run(
            experiment_id,
            run_name=cfg.mlflow_run_name or output_dir.name,
            tags={"megarlhf.output_dir": str(output_dir.absolute())},
        )
        self.run_id = run.info.run_id
        self._log_params(run_config)

    def _get_run(self, run_id: str | None, uri: str):
        from mlflow.exceptions import MlflowException

        if run_id is None:
            return None
        try:
            return self.client.get_run(run_id)
        except MlflowException:
            logger.warning("mlflow: run %s not found at %s; starting a new run", run_id, uri)
            return None

    def _last_logged_step(self, run) -> int:
        """The highest step of any metric the run holds (-1: none)."""
        steps = [
            m.step
            for key in run.data.metrics
            for m in self.client.get_metric_history(run.info.run_id, key)
        ]
        return max(steps, default=-1)

    def _log_params(self, run_config: dict) -> None:
        from mlflow.entities import Param

        params = [
            Param(k, (v if isinstance(v, str) else json.dumps(v))[:_MLFLOW_PARAM_CHARS])
            for k, v in flatten(run_config).items()
        ]
        for i in range(0, len(params), _MLFLOW_BATCH):
            self.client.log_batch(self.run_id, params=params[i : i + _MLFLOW_BATCH])

    def log(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        if step <= self.last_step:
            return  # the run holds this step from the process that was killed
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in scalars.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id, "FINISHED")


TRACKERS: dict[str, type[Tracker]] = {"wandb": WandbTracker, "mlflow": MlflowTracker}


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1} (lists stay values)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class Trackers:
    """The enabled trackers of one run (`logging.<name>: true`), and their `trackers.json`.

    Args:
        output_dir: the run's folder.
        cfg: the `logging:` section (LoggingConfig).
        run_config: the whole run config as a plain dict.
        resume_step: the checkpoint step a resumed run continues after; -1 for a fresh run
            (which starts new tracker runs).
    """

    def __init__(self, output_dir: str | Path, cfg, run_config: dict, resume_step: int = -1):
        output_dir = Path(output_dir)
        self.path = output_dir / TRACKERS_FILE
        stored = self._read() if resume_step >= 0 else {}
        self.trackers = [
            cls(output_dir, cfg, run_config, stored.get(name))
            for name, cls in TRACKERS.items()
            if getattr(cfg, name)
        ]
        if self.trackers:
            state = {**stored, **{t.name: {"run_id": t.run_id} for t in self.trackers}}
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(state, indent=2) + "\n")
            os.replace(tmp, self.path)

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except json.JSONDecodeError:
            logger.warning("%s: unreadable; the trackers start new runs", self.path)
            return {}

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for t in self.trackers:
            t.log(step, scalars)

    def close(self) -> None:
        for t in self.trackers:
            t.close()
