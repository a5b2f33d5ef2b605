"""Checkpoint integrity end to end, through tools/train_sft.py and tools/verify_checkpoint.py.

The tester's cases: a DeepSpeed module file zeroed in place (same size) fails the resume with
one line naming it (was: a bare UnpicklingError); flipped bytes in a safetensors shard fail
`--init-from` (was: trained on it, exit 0, loss 462); a full disk at a save is one clear line,
exit 2, no temp dir left, and the run then resumes bitwise from the previous checkpoint.
"""

import shutil
import subprocess

import pytest

from megarlhf.checkpoint import atomic
from megarlhf.checkpoint.model_shards import rank_file
from tests.checkpoint.test_checksums import _flip
from tests.trainers.common import check, metrics, train
from tools import verify_checkpoint

MIB = 2**20
RUN = ["sft.max_steps=2", "checkpoint.save_every=1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-step SFT run with a checkpoint after each step."""
    out = tmp_path_factory.mktemp("run")
    check(train(out, RUN))
    return out


def _copy(run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out, out / "checkpoints" / "step_000002"


def _one_line_error(proc: subprocess.CompletedProcess, needle: str) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "UnpicklingError" not in proc.stderr
    (line,) = [line for line in proc.stderr.splitlines() if needle in line]
    return line


def test_zeroed_deepspeed_file_fails_resume_naming_it(run, tmp_path):
    out, step2 = _copy(run, tmp_path)
    bad = step2 / "deepspeed" / "state" / "mp_rank_00_model_states.pt"
    bad.write_bytes(bytes(bad.stat().st_size))  # zeroed, same size: a complete checkpoint still
    assert atomic.find_latest(out / "checkpoints") == step2
    line = _one_line_error(train(out, ["sft.max_steps=3"]), "checksum mismatch")
    assert f"{bad}: checksum mismatch (recorded xxh3:" in line
    earlier = step2.parent / "step_000001"
    assert (
        f"the file is corrupt; resume from an earlier checkpoint (--resume-from {earlier})" in line
    )


def test_flipped_shard_bytes_fail_init_from_naming_the_file(run, tmp_path):
    _, step2 = _copy(run, tmp_path)
    bad = rank_file(step2, 0, 0)
    _flip(bad, offset=bad.stat().st_size // 2, n=64)  # data bytes, not the header
    proc = train(tmp_path / "new", ["sft.max_steps=1"], extra_args=["--init-from", str(step2)])
    line = _one_line_error(proc, "checksum mismatch")
    assert f"{bad}: checksum mismatch (recorded xxh3:" in line and "the file is corrupt" in line
    assert not (tmp_path / "new" / "metrics.jsonl").exists()  # not a step trained on it


# ----------------------------------------------------------------------------- verify_checkpoint


def _verify(capsys, path) -> tuple[int, list[str]]:
    code = verify_checkpoint.main([str(path)])
    return code, capsys.readouterr().out.splitlines()


def test_verify_checkpoint_clean_corrupt_and_bad_argument(run, tmp_path, capsys):
    out, step2 = _copy(run, tmp_path)
    for path in (out, out / "checkpoints", step2):  # a run dir and a root mean their latest
        code, lines = _verify(capsys, path)
        assert code == 0 and lines[-1].startswith(f"{step2}: OK: checked "), lines
    bad_ds = step2 / "deepspeed" / "state" / "mp_rank_00_model_states.pt"
    bad_ds.write_bytes(bytes(bad_ds.stat().st_size))
    _flip(rank_file(step2, 0, 0), offset=4000)
    (step2 / "rng" / "rank_00000.pt").unlink()
    code, lines = _verify(capsys, out)
    assert code == 1
    assert sorted(lines[:-1]) == sorted(
        [
            f"{step2 / 'rng' / 'rank_00000.pt'}: missing",
            *[x for x in lines if x.startswith(f"{bad_ds}: checksum mismatch")],
            *[x for x in lines if x.startswith(f"{rank_file(step2, 0, 0)}: checksum mismatch")],
        ]
    )
    assert len(lines) == 4 and lines[-1].startswith(f"{step2}: CORRUPT: 3 problem(s)")
    assert _verify(capsys, out / "checkpoints" / "step_000001")[0] == 0  # the earlier one is fine
    assert verify_checkpoint.main([str(tmp_path / "missing")]) == 2
    (tmp_path / "empty").mkdir()
    assert verify_checkpoint.main([str(tmp_path / "empty")]) == 2
    assert "is not a checkpoint" in capsys.readouterr().err


def test_verify_checkpoint_on_a_model_shard_dir(run, tmp_path, capsys):
    """A converted model (sidecar checksums) and one written before checksums (none)."""
    import json

    from megarlhf.checkpoint.model_shards import ModelShardsReader, ModelShardsWriter

    src = atomic.find_latest(run / "checkpoints")
    shards = tmp_path / "converted"
    with ModelShardsReader(src) as reader:  # written the way convert_hf.py writes one
        writer = ModelShardsWriter(
            shards, reader.cfg, 1, 2, {n: reader.info(n) for n in reader.names()}
        )
        for name in reader.names():
            writer.write(name, reader.full_tensor(name))
        writer.close()
    sidecar = json.loads((shards / "model" / "checksums.json").read_text())
    assert sorted(sidecar["files"]) == [
        "meta.json",
        "tp00_pp00.safetensors",
        "tp00_pp01.safetensors",
    ]
    code, lines = _verify(capsys, shards)
    assert code == 0 and lines[-1].startswith(f"{shards}: OK: checked 3 files"), lines
    _flip(rank_file(shards, 0, 1), offset=rank_file(shards, 0, 1).stat().st_size - 100)
    code, lines = _verify(capsys, shards)
    assert code == 1 and lines[0].startswith(f"{rank_file(shards, 0, 1)}: checksum mismatch")
    (shards / "model" / "checksums.json").unlink()  # as written before checksums existed
    code, lines = _verify(capsys, shards)
    assert code == 0 and "no checksums recorded" in lines[0], lines
    rank_file(shards, 0, 0).unlink()
    code, lines = _verify(capsys, shards)
    assert code == 1 and f"{rank_file(shards, 0, 0)}: missing" in lines


# ----------------------------------------------------------------------------- full disk


def test_full_disk_at_a_save_then_resume_is_bitwise(tmpfs, tmp_path):
    """5 MiB hold the first checkpoint (2.8 MiB), not a second beside it: the save of step 4 is
    refused before writing; with more space the run resumes from step 2 and steps 3 and 4 are
    bitwise those of the failed run."""
    where = tmpfs(5 * MIB)
    out, run = where / "run", ["sft.max_steps=4", "checkpoint.save_every=2"]
    line = _one_line_error(train(out, run), "no space left")
    root = out / "checkpoints"
    assert f"checkpoint step_000004: no space left on {root} (needed ~" in line
    assert "latest still names step_000002" in line
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000002"]  # no temp dir
    failed = metrics(out)
    assert [r["step"] for r in failed] == [1, 2, 3, 4]
    subprocess.run(["mount", "-o", "remount,size=12m", str(where)], check=True)
    resumed = check(train(out, run))
    assert "resumed from" in resumed.stderr and "step_000002" in resumed.stderr
    got = metrics(out)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for key in ("loss", "grad_norm", "lr", "tokens"):
        assert [r[key] for r in got] == [r[key] for r in failed], key
    assert atomic.find_latest(root).name == "step_000004"
