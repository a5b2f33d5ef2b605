"""Checksums of atomic checkpoints: recorded per file at save, checked by `verify_files` and
`check_checkpoint`, named in the error; sha256 when xxhash is missing; old checkpoints load.

The expected digests come from xxhash / hashlib over the whole file at once (an independent
reference for the chunked, streaming hash)."""

import hashlib
import json
import logging

import pytest
import xxhash

from megarlhf.checkpoint import atomic, checksums
from megarlhf.checkpoint.atomic import (
    MANIFEST,
    CheckpointDirError,
    check_checkpoint,
    read_manifest,
    save_checkpoint,
    verify_files,
)
from megarlhf.checkpoint.errors import CheckpointError, CorruptCheckpointError
from tests.checkpoint.helpers import payload, writer


def _xxh3(data: bytes) -> str:
    return f"xxh3:{xxhash.xxh3_64(data).hexdigest()}"


def _flip(path, offset: int = 10, n: int = 4) -> None:
    """Corrupt `n` bytes of `path` in place, keeping its size."""
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_streaming_checksum_matches_one_shot_digests(tmp_path, monkeypatch):
    monkeypatch.setattr(checksums, "CHUNK", 1000)  # many chunks, the last one partial
    data = bytes(range(256)) * 37 + b"tail"
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    assert checksums.file_checksum(path) == _xxh3(data)
    assert checksums.file_checksum(path, "sha256") == f"sha256:{hashlib.sha256(data).hexdigest()}"
    (tmp_path / "empty").write_bytes(b"")
    assert checksums.file_checksum(tmp_path / "empty") == _xxh3(b"")


def test_save_records_every_files_checksum_in_markers_and_manifest(tmp_path):
    def write(tmp):
        files = writer(4)(tmp)
        (tmp / "unlisted.txt").write_bytes(b"a helper script no rank lists")
        return files

    final = save_checkpoint(tmp_path, 4, write)
    manifest = read_manifest(final)
    assert set(manifest["checksums"]) == set(manifest["files"])  # unlisted and markers too
    for rel, data in payload(4).items():
        assert manifest["checksums"][rel] == _xxh3(data)
    assert manifest["checksums"]["unlisted.txt"] == _xxh3(b"a helper script no rank lists")
    marker = json.loads((final / "_ranks" / "rank_00000.json").read_text())
    assert marker["checksums"] == {rel: _xxh3(d) for rel, d in payload(4).items()}
    # A rank that does not list its files: rank 0 hashes them at commit.
    final = save_checkpoint(tmp_path, 5, lambda tmp: (writer(5)(tmp), None)[1])
    assert read_manifest(final)["checksums"]["model.bin"] == _xxh3(payload(5)["model.bin"])


def test_same_size_corruption_is_named_on_load_and_by_check(tmp_path):
    final = save_checkpoint(tmp_path, 2, writer(2))
    verify_files(final, ["model.bin", "opt/state.bin"])  # clean
    assert check_checkpoint(final).problems == []
    _flip(final / "model.bin")
    assert atomic.incomplete_reason(final) is None  # sizes alone do not see it
    with pytest.raises(CorruptCheckpointError) as info:
        verify_files(final, ["opt/state.bin", "model.bin"], hint="resume from step_000001")
    msg = str(info.value)
    assert msg.startswith(f"{final / 'model.bin'}: checksum mismatch (recorded xxh3:")
    want = _xxh3(payload(2)["model.bin"])
    assert f"(recorded {want}, found xxh3:" in msg
    assert msg.endswith("the file is corrupt; resume from step_000001")
    # Both kinds of user error: the training tools exit 2 on CheckpointDirError.
    assert isinstance(info.value, CheckpointDirError) and isinstance(info.value, CheckpointError)
    verify_files(final, ["opt/state.bin"])  # only the files a loader reads are checked
    (problem,) = check_checkpoint(final).problems
    assert problem.startswith(f"{final / 'model.bin'}: checksum mismatch")


def test_checkpoint_saved_before_checksums_still_loads(tmp_path, caplog):
    final = save_checkpoint(tmp_path, 3, writer(3))
    manifest = json.loads((final / MANIFEST).read_text())
    del manifest["checksums"]
    (final / MANIFEST).write_text(json.dumps(manifest))
    _flip(final / "model.bin")  # undetectable without checksums, and not refused
    with caplog.at_level(logging.DEBUG, logger="megarlhf.checkpoint.atomic"):
        verify_files(final, ["model.bin"])
    assert "no checksums recorded (saved before checksums)" in caplog.text
    report = check_checkpoint(final)
    assert report.problems == [] and "no checksums recorded" in report.notes[0]


def test_sha256_fallback_without_xxhash(tmp_path, monkeypatch, caplog):
    recorded_with_xxh3 = save_checkpoint(tmp_path, 1, writer(1))
    monkeypatch.setattr(checksums, "xxhash", None)
    monkeypatch.setattr(checksums, "ALGORITHM", "sha256")
    final = save_checkpoint(tmp_path, 2, writer(2))
    sums = read_manifest(final)["checksums"]
    assert sums["model.bin"] == f"sha256:{hashlib.sha256(payload(2)['model.bin']).hexdigest()}"
    _flip(final / "model.bin")
    with pytest.raises(CorruptCheckpointError, match="recorded sha256:"):
        verify_files(final, ["model.bin"])
    # xxh3 records cannot be checked here: a warning, not a refusal.
    with caplog.at_level(logging.WARNING):
        verify_files(recorded_with_xxh3, ["model.bin"])
    assert "cannot check its xxh3 checksum here" in caplog.text


def test_check_checkpoint_reports_missing_resized_and_torn(tmp_path):
    final = save_checkpoint(tmp_path, 6, writer(6))
    (final / "opt" / "state.bin").unlink()
    (final / "model.bin").write_bytes(b"short")
    report = check_checkpoint(final)
    assert sorted(report.problems) == sorted(
        [
            f"{final / 'opt' / 'state.bin'}: missing",
            f"{final / 'model.bin'}: 5 bytes, {len(payload(6)['model.bin'])} were written",
        ]
    )
    torn = tmp_path / "step_000007"
    torn.mkdir()
    assert check_checkpoint(torn).problems == [
        f"{torn}: has no {MANIFEST} (torn: its save never finished)"
    ]
