"""W&B (offline) and MLflow trackers of tools/train_sft.py, read back from what they stored: the
offline run's `.wandb` transaction log (read record by record below) and MLflow's own client.

A 4-step run with a checkpoint every 2 steps is SIGKILLed right after step 3 and resumed from
step 2: both trackers continue the same run id with metrics.jsonl's values; MLflow holds every
step exactly once (step 3 from the killed process), the resumed W&B process sends steps 3 and 4
again (W&B keeps the copy it has; the killed process's unflushed W&B data is lost). Under
torchrun with two ranks only rank 0 logs: one W&B run (all steps, the config), one MLflow run.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest

from megarlhf.config import ConfigError
from megarlhf.config.loop import LoggingConfig
from megarlhf.utils.trackers import TRACKERS_FILE, flatten
from tests.trainers.common import check, metrics, train

pytest.importorskip("wandb")
pytest.importorskip("mlflow")

TRACKED = ["logging.wandb=true", "logging.mlflow=true", "logging.wandb_project=tests"]
RUN = ["sft.max_steps=4", "checkpoint.save_every=2", *TRACKED]
LOSS = "train/loss"


@pytest.fixture(autouse=True)
def offline_wandb(monkeypatch, tmp_path):
    """W&B offline, its settings and caches inside the test's folder (the runs inherit env)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))


# ----------------------------------------------------------------------------- reading W&B files

# The `.wandb` file: a 7-byte header (":W&B", magic 0xBEE1, version 0), then LevelDB-log framing:
# 32 KiB blocks of records, each a 7-byte header (CRC-32 of type byte + data, length, type) and
# its data; a record that does not fit a block is split FIRST / MIDDLE / LAST. Each record's
# data is a wandb_internal_pb2.Record protobuf.
_BLOCK, _HEADER = 32768, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_records(path: Path):
    """The protobuf Records of a `.wandb` file, in order (checksums verified)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:_HEADER])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"{path}: not a .wandb file"
    pos, parts = _HEADER, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # block trailer
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        if kind == 0:  # zero padding to the block's end
            pos += left
            continue
        body = data[pos + _HEADER : pos + _HEADER + length]
        assert zlib.crc32(bytes([kind]) + body) == crc, f"{path}: bad record at byte {pos}"
        pos += _HEADER + length
        parts = body if kind in (_FULL, _FIRST) else parts + body
        if kind in (_FULL, _LAST):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(parts)
            yield rec


def _key(item) -> str:
    """A history / config item's name: `key`, or its one-element `nested_key`."""
    return item.key or "/".join(item.nested_key)


def wandb_run(run_dir: Path) -> dict:
    """{"id", "config" (top-level key -> value), "history" ({step: {key: value}})} of one
    offline run folder."""
    (path,) = run_dir.glob("run-*.wandb")
    out: dict = {"id": None, "config": {}, "history": {}}
    for rec in wandb_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["id"] = rec.run.run_id
            updates = rec.run.config.update
        elif kind == "config":
            updates = rec.config.update
        elif kind == "history":
            row = {_key(item): json.loads(item.value_json) for item in rec.history.item}
            out["history"].setdefault(rec.history.step.num, {}).update(row)
            continue
        else:
            continue
        out["config"].update({_key(u): json.loads(u.value_json) for u in updates})
    return out


def wandb_runs(out: Path) -> list[dict]:
    """Every offline run folder of a training run's output dir, in start order."""
    return [wandb_run(d) for d in sorted((out / "wandb").glob("offline-run-*"))]


def mlflow_client(out: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{out.absolute() / 'mlflow.db'}")


def mlflow_history(out: Path, run_id: str, key: str = LOSS) -> dict[int, list[float]]:
    hist: dict[int, list[float]] = {}
    for m in mlflow_client(out).get_metric_history(run_id, key):
        hist.setdefault(m.step, []).append(m.value)
    return hist


# ----------------------------------------------------------------------------- tests


def test_killed_and_resumed_run_continues_both_tracker_runs(tmp_path):
    out = tmp_path / "run"
    killed = train(out, RUN, fault="step:3")
    assert killed.returncode == -9, killed.stderr[-3000:]
    ids = json.loads((out / TRACKERS_FILE).read_text())
    assert ids.keys() == {"wandb", "mlflow"}
    check(train(out, RUN))
    assert json.loads((out / TRACKERS_FILE).read_text()) == ids  # the same tracker runs
    loss = {r["step"]: r["loss"] for r in metrics(out)}
    assert sorted(loss) == [1, 2, 3, 4]

    # W&B: one offline folder per process, one run id. The resumed process sends every step
    # after its checkpoint (2); what the SIGKILLed one had not flushed yet is lost, so its
    # folder holds some prefix of steps 1..3.
    folders = sorted((out / "wandb").glob("offline-run-*"))
    assert [f.name.rsplit("-", 1)[1] for f in folders] == [ids["wandb"]["run_id"]] * 2
    killed_run, resumed = wandb_run(folders[0]), wandb_run(folders[1])
    assert resumed["id"] == ids["wandb"]["run_id"]
    assert sorted(resumed["history"]) == [3, 4]
    assert set(killed_run["history"]) <= {1, 2, 3}
    for run in (killed_run, resumed):
        for step, row in run["history"].items():
            assert row[LOSS] == pytest.approx(loss[step], rel=1e-12), step
    assert resumed["config"]["sft"]["max_steps"] == 4
    assert resumed["config"]["logging"]["wandb"] is True

    # MLflow: every step exactly once, step 3 from the killed process (the resume repeats it
    # bit for bit), params logged once when the run was created.
    run_id = ids["mlflow"]["run_id"]
    run = mlflow_client(out).get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["sft.max_steps"] == "4"
    assert run.data.params["data.train_files"] == '["data/sft_tiny.jsonl"]'
    history = mlflow_history(out, run_id)
    assert history == {s: [pytest.approx(v, rel=1e-12)] for s, v in loss.items()}
    assert sorted(mlflow_history(out, run_id, "train/lr")) == [1, 2, 3, 4]


def test_only_rank_zero_logs_under_torchrun(tmp_path):
    out = tmp_path / "run"
    check(train(out, ["sft.max_steps=2", *TRACKED], "torchrun", 2))
    (run,) = wandb_runs(out)
    assert sorted(run["history"]) == [1, 2]  # a finished run: everything flushed
    assert run["config"]["sft"]["max_steps"] == 2
    loss = {r["step"]: r["loss"] for r in metrics(out)}
    assert {s: row[LOSS] for s, row in run["history"].items()} == pytest.approx(loss, rel=1e-12)
    runs = mlflow_client(out).search_runs(
        [e.experiment_id for e in mlflow_client(out).search_experiments()]
    )
    assert len(runs) == 1
    assert sorted(mlflow_history(out, runs[0].info.run_id)) == [1, 2]


def test_logging_config_checks_tracker_fields():
    with pytest.raises(ConfigError, match=r"wandb_run_id: 'a/b': W&B run ids cannot contain"):
        LoggingConfig(wandb=True, wandb_run_id="a/b")
    with pytest.raises(ConfigError, match="mlflow_experiment: must not be empty"):
        LoggingConfig(mlflow=True, mlflow_experiment="")
    assert not LoggingConfig().wandb and not LoggingConfig().mlflow  # off unless asked for


def test_flatten_gives_dotted_param_names():
    nested = {"a": {"b": 1, "c": {"d": [1, 2]}}, "e": "x", "f": {}}
    assert flatten(nested) == {"a.b": 1, "a.c.d": [1, 2], "e": "x", "f": {}}
