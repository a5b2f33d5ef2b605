"""A full disk: the save refuses before writing when the free space is short, turns ENOSPC in the
middle of a write (torch's zip writer reports it as a bare RuntimeError) into one clear
CheckpointDirError, removes its temp dir, and leaves the previous checkpoint as `latest`.

Two ways: simulated (`shutil.disk_usage` and the writes monkeypatched; always runs) and real, on a
small tmpfs mounted for the test (the `tmpfs` fixture of conftest.py: needs root / CAP_SYS_ADMIN,
skipped otherwise)."""

import errno
import os
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from megarlhf.checkpoint import atomic
from megarlhf.checkpoint.atomic import (
    LATEST,
    SPACE_MARGIN,
    SPACE_SLACK,
    CheckpointDirError,
    checkpoint_bytes,
    find_latest,
    save_checkpoint,
)
from tests.checkpoint.helpers import assert_is_step, writer

Usage = namedtuple("Usage", "total used free")
MIB = 2**20


def _fake_free(monkeypatch, free: int) -> None:
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda path: Usage(10 * free, 9 * free, free))


def _assert_only_step(root: Path, step: int) -> None:
    """`latest` names `step`, its files are intact, and no temp dir of a failed save is left."""
    assert (root / LATEST).read_text() == f"step_{step:06d}\n"
    assert_is_step(find_latest(root), step)
    assert not [p.name for p in root.iterdir() if p.name.startswith((".tmp_", ".trash_"))]


def _never_called(tmp):
    raise AssertionError("write_fn must not run when the space is short")


def test_short_space_is_refused_before_writing(tmp_path, monkeypatch):
    root = tmp_path / "ckpt"
    save_checkpoint(root, 1, writer(1))
    needed = int(checkpoint_bytes(root / "step_000001") * (1 + SPACE_MARGIN)) + SPACE_SLACK
    _fake_free(monkeypatch, needed - 1)
    with pytest.raises(CheckpointDirError) as info:
        save_checkpoint(root, 2, _never_called)
    assert str(info.value).startswith(
        f"checkpoint step_000002: no space left on {root} (needed ~{needed / MIB:.1f} MiB, free "
        f"{(needed - 1) / MIB:.1f} MiB); latest still names step_000001"
    )
    _assert_only_step(root, 1)
    _fake_free(monkeypatch, needed)  # just enough
    assert save_checkpoint(root, 2, writer(2)) == root / "step_000002"


def test_first_save_checks_the_callers_estimate(tmp_path, monkeypatch):
    _fake_free(monkeypatch, 5 * MIB)
    with pytest.raises(
        CheckpointDirError, match=r"needed ~10\.4 MiB, free 5\.0 MiB\); there is no"
    ):
        save_checkpoint(tmp_path, 1, _never_called, expected_bytes=10 * MIB)
    assert find_latest(tmp_path) is None and os.listdir(tmp_path) == []
    save_checkpoint(tmp_path, 1, writer(1), expected_bytes=4 * MIB)  # fits
    save_checkpoint(tmp_path / "other", 1, writer(1))  # no estimate: not checked


def test_every_rank_raises_when_rank_0_refused(tmp_path, monkeypatch):
    # Rank 1's view (a barrier that returns at once): rank 0 created no temp dir.
    _fake_free(monkeypatch, MIB)
    kw = {"rank": 1, "world_size": 2, "barrier": lambda: None, "expected_bytes": 2 * MIB}
    with pytest.raises(CheckpointDirError, match=r"step_000003: no space left .*free 1\.0 MiB"):
        save_checkpoint(tmp_path, 3, _never_called, **kw)
    _fake_free(monkeypatch, 100 * MIB)  # space enough: rank 0 failed for another reason
    with pytest.raises(CheckpointDirError, match="rank 0 did not create"):
        save_checkpoint(tmp_path, 3, _never_called, **kw)


def _fill_then_raise(exc: Exception, monkeypatch=None, free: int = 0):
    def write(tmp):
        writer(2)(tmp)  # some files written, then the disk is full
        if monkeypatch is not None:
            _fake_free(monkeypatch, free)
        raise exc

    return write


@pytest.mark.parametrize(
    "exc, free",
    [
        (OSError(errno.ENOSPC, "No space left on device"), 50 * MIB),
        # torch.save on a full disk (what the tester saw); only the free space says why.
        (
            RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 6912 vs 6806"),
            0,
        ),
        # safetensors' writer on a full disk.
        (Exception("Error while serializing: I/O error: No space left on device (os error 28)"), 9),
    ],
    ids=["ENOSPC", "torch-zip-writer", "safetensors"],
)
def test_disk_filling_up_during_the_write(tmp_path, monkeypatch, exc, free):
    root = tmp_path / "ckpt"
    save_checkpoint(root, 1, writer(1))
    with pytest.raises(CheckpointDirError) as info:
        save_checkpoint(root, 2, _fill_then_raise(exc, monkeypatch, free))
    assert str(info.value).startswith(f"checkpoint step_000002: no space left on {root} (needed ")
    assert "the disk filled up while writing, the partial checkpoint was removed" in str(info.value)
    assert info.value.__cause__ is exc
    _assert_only_step(root, 1)


def test_other_write_errors_are_not_called_a_full_disk(tmp_path, monkeypatch):
    root = tmp_path / "ckpt"
    save_checkpoint(root, 1, writer(1))
    _fake_free(monkeypatch, 50 * MIB)
    bug = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 6912 vs 6806")
    with pytest.raises(RuntimeError) as info:
        save_checkpoint(root, 2, _fill_then_raise(bug))
    assert info.value is bug
    _assert_only_step(root, 1)


def test_commit_failing_for_space_removes_the_new_checkpoint(tmp_path, monkeypatch):
    root = tmp_path / "ckpt"
    save_checkpoint(root, 1, writer(1))
    real = atomic.write_file_atomic

    def full_at_latest(path, data):
        if Path(path).name == LATEST:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(atomic, "write_file_atomic", full_at_latest)
    with pytest.raises(CheckpointDirError, match="step_000002: no space left"):
        save_checkpoint(root, 2, writer(2))
    assert not (root / "step_000002").exists()  # committed, but `latest` could not name it
    _assert_only_step(root, 1)


# ----------------------------------------------------------------------------- a real tmpfs


def test_real_full_tmpfs_during_torch_save(tmpfs):
    root = tmpfs(1 * MIB) / "ckpt"
    save_checkpoint(root, 1, writer(1))
    before = shutil.disk_usage(root).free

    def write(tmp):  # 2 MiB into what is left of 1 MiB, past the estimate from step 1
        torch.save({"w": torch.zeros(512 * 1024)}, tmp / "big.pt")
        return ["big.pt"]

    with pytest.raises(CheckpointDirError) as info:
        save_checkpoint(root, 2, write)
    msg = str(info.value)
    assert msg.startswith(f"checkpoint step_000002: no space left on {root} (needed more than ")
    assert "unexpected pos" in str(info.value.__cause__)  # torch's own words
    _assert_only_step(root, 1)
    assert shutil.disk_usage(root).free == before  # the partial file is gone
    save_checkpoint(root, 2, writer(2))  # a save that fits still works
    _assert_only_step(root, 2)
