"""Atomic checkpoint directories: commit, keep-last-N, find_latest fallbacks, and crashes.

The crash tests kill real processes with SIGKILL: one before every filesystem operation of a save
(and between a rank's files), and one rank of two in the middle of its writes. Whatever the
moment, `find_latest` must return a checkpoint whose files are exactly those of its step.
"""

import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from megarlhf.checkpoint.atomic import (
    LATEST,
    MANIFEST,
    CheckpointDirError,
    find_latest,
    incomplete_reason,
    list_checkpoints,
    read_manifest,
    save_checkpoint,
)
from tests.checkpoint.helpers import assert_is_step, payload, writer

REPO = Path(__file__).parents[2]


def test_save_commits_manifest_and_latest(tmp_path):
    final = save_checkpoint(tmp_path, 7, writer(7), meta={"tokens": 123})
    assert final == tmp_path / "step_000007"
    assert (tmp_path / LATEST).read_text() == "step_000007\n"
    assert find_latest(tmp_path) == final
    assert_is_step(final, 7)
    m = read_manifest(final)
    assert m["meta"] == {"tokens": 123} and m["world_size"] == 1
    assert m["files"]["model.bin"] == len(payload(7)["model.bin"])
    assert sorted(os.listdir(tmp_path)) == [LATEST, "step_000007"]  # nothing left over


def test_keep_last_n_and_abandoned_newer_checkpoints(tmp_path):
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, writer(step), keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 5]
    # Step 7 committed but the run died before `latest`: resuming comes from step 5 ...
    save_checkpoint(tmp_path, 7, writer(7))
    (tmp_path / LATEST).write_text("step_000005\n")
    assert_is_step(find_latest(tmp_path), 5)
    # ... and the resumed run's next save drops step 7, which belongs to the abandoned run.
    save_checkpoint(tmp_path, 6, writer(6), keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [5, 6]
    assert_is_step(find_latest(tmp_path), 6)


def test_resaving_an_existing_step_replaces_it(tmp_path):
    save_checkpoint(tmp_path, 3, writer(1))
    save_checkpoint(tmp_path, 3, writer(3))
    assert_is_step(find_latest(tmp_path), 3)


def test_find_latest_fallbacks(tmp_path, caplog):
    assert find_latest(tmp_path / "missing") is None
    assert find_latest(tmp_path) is None
    (tmp_path / ".tmp_step_000001").mkdir()
    (tmp_path / "step_000001").mkdir()  # torn: no manifest
    with caplog.at_level(logging.WARNING):
        assert find_latest(tmp_path) is None
    assert "ignoring incomplete checkpoint dirs .tmp_step_000001, step_000001" in caplog.text

    save_checkpoint(tmp_path, 2, writer(2))
    save_checkpoint(tmp_path, 3, writer(3))
    (tmp_path / LATEST).write_text("step_000009\n")  # missing
    with caplog.at_level(logging.WARNING):
        assert_is_step(find_latest(tmp_path), 3)
    assert "names 'step_000009', which missing; using" in caplog.text

    (tmp_path / "step_000003" / "model.bin").write_bytes(b"truncated")
    assert "has model.bin of 9 bytes" in incomplete_reason(tmp_path / "step_000003")
    (tmp_path / LATEST).write_text("step_000003\n")
    assert_is_step(find_latest(tmp_path), 2)  # newest complete one

    (tmp_path / "step_000002" / MANIFEST).unlink()
    with pytest.raises(CheckpointDirError, match="holds no complete checkpoint"):
        find_latest(tmp_path)
    (tmp_path / LATEST).unlink()
    assert find_latest(tmp_path) is None


def test_commit_refuses_when_a_rank_did_not_write(tmp_path):
    # A barrier that does not wait (a bug) must not let rank 0 commit without rank 1's files.
    with pytest.raises(CheckpointDirError, match="rank 1 did not finish writing"):
        save_checkpoint(tmp_path, 1, writer(1), rank=0, world_size=2, barrier=lambda: None)
    assert find_latest(tmp_path) is None
    with pytest.raises(ValueError, match="a barrier is required"):
        save_checkpoint(tmp_path, 1, writer(1), rank=0, world_size=2)


# ----------------------------------------------------------------------------- crashes

CRASH_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    sys.path.insert(0, {repo!r})
    from megarlhf.checkpoint import atomic
    from tests.checkpoint.helpers import writer

    root, kill_at = Path(sys.argv[1]), int(sys.argv[2])
    count = 0

    def tick():
        global count
        count += 1
        if count == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def before(fn):
        def wrapped(*args, **kwargs):
            tick()
            return fn(*args, **kwargs)
        return wrapped

    for name in ("fsync", "rename", "replace", "mkdir", "rmdir", "unlink"):
        setattr(os, name, before(getattr(os, name)))
    atomic.save_checkpoint(root, 2, writer(2, tick), keep_last=1)
    """
)


def test_sigkill_at_every_point_of_a_save_never_exposes_a_torn_checkpoint(tmp_path):
    script = CRASH_SCRIPT.format(repo=str(REPO))
    outcomes = []
    for kill_at in range(1, 200):
        root = tmp_path / f"k{kill_at}"
        save_checkpoint(root, 1, writer(1))
        proc = subprocess.run([sys.executable, "-c", script, str(root), str(kill_at)])
        latest = find_latest(root)
        if proc.returncode == 0:
            assert_is_step(latest, 2)
            break
        assert proc.returncode == -signal.SIGKILL
        step = 2 if latest.name == "step_000002" else 1
        assert_is_step(latest, step)
        outcomes.append((step, (root / "step_000002").is_dir()))
        # The next save after the crash succeeds and cleans up.
        save_checkpoint(root, 2, writer(2), keep_last=1)
        assert_is_step(find_latest(root), 2)
        assert sorted(os.listdir(root)) == [LATEST, "step_000002"]
    else:
        pytest.fail("the save never completed")
    assert len(outcomes) > 20
    assert (1, False) in outcomes  # killed before the rename
    assert (1, True) in outcomes  # killed after the rename, before `latest`
    assert (2, True) in outcomes  # killed after `latest`, while pruning


RANK_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path
    sys.path.insert(0, {repo!r})
    from megarlhf.checkpoint.atomic import save_checkpoint
    from tests.checkpoint.helpers import writer

    root, sync, rank, die = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    calls = 0

    def barrier():  # a file barrier with a timeout, like a collective's
        global calls
        calls += 1
        (sync / f"{{calls}}_{{rank}}").touch()
        deadline = time.monotonic() + 3
        while not all((sync / f"{{calls}}_{{r}}").exists() for r in range(2)):
            if time.monotonic() > deadline:
                raise TimeoutError("barrier timed out")
            time.sleep(0.01)

    def tick():
        if die == "yes" and rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)

    write = writer(2, tick, prefix=f"rank{{rank}}/")
    save_checkpoint(root, 2, write, rank=rank, world_size=2, barrier=barrier)
    """
)


@pytest.mark.parametrize("die", ["yes", "no"])
def test_two_ranks_one_killed_mid_write(tmp_path, die):
    root, script = tmp_path / "ckpt", RANK_SCRIPT.format(repo=str(REPO))
    save_checkpoint(root, 1, writer(1))
    procs = []
    (tmp_path / "sync").mkdir()
    for rank in range(2):
        args = [str(root), str(tmp_path / "sync"), str(rank), die]
        procs.append(subprocess.Popen([sys.executable, "-c", script, *args]))
    codes = [p.wait(timeout=60) for p in procs]
    if die == "no":
        assert codes == [0, 0]
        assert_is_step(find_latest(root), 2, prefixes=("rank0/", "rank1/"))
        assert read_manifest(root / "step_000002")["world_size"] == 2
        return
    assert codes[1] == -signal.SIGKILL and codes[0] != 0  # rank 0 timed out at the barrier
    assert_is_step(find_latest(root), 1)
    assert not (root / "step_000002").exists() and (root / ".tmp_step_000002").is_dir()


# ----------------------------------------------------------------------------- real process group


def _save_on_gloo_ranks(rank, world_size, root):
    import torch

    from megarlhf.checkpoint.atomic import process_group_barrier
    from megarlhf.checkpoint.rng import save_rng_state

    torch.manual_seed(100 + rank)

    def write(tmp):
        shard = tmp / f"shard_{rank}.pt"
        torch.save({"rank": rank}, shard)
        return [save_rng_state(tmp, rank), shard]

    barrier = process_group_barrier()
    save_checkpoint(root, 5, write, rank=rank, world_size=world_size, barrier=barrier)
    return torch.rand(3)  # the draws a resumed rank must reproduce


def test_gloo_ranks_save_one_checkpoint_with_per_rank_rng(tmp_path):
    import torch

    from megarlhf.checkpoint.rng import load_rng_state
    from tests.dist import run_ranks

    draws = run_ranks(_save_on_gloo_ranks, 2, str(tmp_path), timeout=120)
    ckpt = find_latest(tmp_path)
    manifest = read_manifest(ckpt)
    assert ckpt.name == "step_000005" and manifest["world_size"] == 2
    for r in range(2):
        assert f"rng/rank_{r:05d}.pt" in manifest["files"] and f"shard_{r}.pt" in manifest["files"]
        load_rng_state(ckpt, r)
        assert torch.equal(torch.rand(3), draws[r])
    assert not torch.equal(draws[0], draws[1])


def test_relative_root_with_write_fn_returning_joined_paths(tmp_path, monkeypatch):
    # A run started with `--output-dir runs/x` hands a relative root; trainers return files as
    # `tmp_dir / name`. Those must not be re-joined onto the temp dir.
    monkeypatch.chdir(tmp_path)
    inner = writer(3)

    def write(tmp: Path):
        return [tmp / rel for rel in inner(tmp)]

    final = save_checkpoint(Path("runs/x/checkpoints"), 3, write)
    assert final == tmp_path / "runs/x/checkpoints/step_000003"
    assert_is_step(final, 3)
