"""One live run per output directory: a second launch is refused in one line naming the holder,
on every rank; a lock left by a SIGKILLed run does not block the next one."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from megarlhf.utils.run_lock import LOCK_NAME, RunLockError, acquire, acquire_on_rank0
from tests.dist import run_ranks
from tests.trainers.common import QUIET, ROOT, TINY, command, env


def test_second_lock_is_refused_naming_the_holder(tmp_path):
    lock = acquire(tmp_path / "out")
    holder = f"pid {os.getpid()} on host {socket.gethostname()}"
    with pytest.raises(RunLockError, match=f"is in use by another run: {holder}"):
        acquire(tmp_path / "out")  # another open file: flock refuses it even in one process
    lock.release()
    acquire(tmp_path / "out").release()  # free again


def test_lock_of_a_killed_process_does_not_block(tmp_path):
    code = (
        "import sys, time\n"
        "from megarlhf.utils.run_lock import acquire\n"
        f"lock = acquire({str(tmp_path)!r})\n"
        "print('locked', flush=True)\n"
        "time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env=env())  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockError, match=f"pid {proc.pid} "):
            acquire(tmp_path)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert (tmp_path / LOCK_NAME).exists()  # the file stays; the kernel dropped the lock
    acquire(tmp_path).release()


def _try_lock(rank, world, out):
    """Rank 1 holds the lock (as another run would) while both ranks ask; then it lets go and
    they ask again."""
    import torch.distributed as dist

    def attempt() -> str:
        try:
            lock = acquire_on_rank0(out, rank)
        except RunLockError as e:
            return f"refused: {e}"
        if lock is not None:
            lock.release()
        return "locked" if rank == 0 else "told it is free"

    held = acquire(out) if rank == 1 else None
    dist.barrier()
    while_held = attempt()
    dist.barrier()
    if held is not None:
        held.release()
    dist.barrier()
    return while_held, attempt(), os.getpid()


def test_every_rank_learns_of_the_refusal(tmp_path):
    results = run_ranks(_try_lock, 2, str(tmp_path), timeout=120)
    holder = f"pid {results[1][2]} on host {socket.gethostname()}"
    assert all(r[0].startswith("refused: ") and holder in r[0] for r in results), results
    assert [r[1] for r in results] == ["locked", "told it is free"]


@pytest.mark.timeout(240)
def test_second_launch_on_a_live_run_is_refused_on_every_rank(tmp_path):
    out = tmp_path / "run"
    base = ["--config", TINY, "--output-dir", str(out), *QUIET, "checkpoint.save_final=false"]
    first = subprocess.Popen(
        command("plain") + base + ["sft.max_steps=400"], env=env(), cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        metrics = out / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
            assert first.poll() is None and time.monotonic() < deadline, "first run did not start"
            time.sleep(0.1)
        first.send_signal(signal.SIGSTOP)  # alive and holding the lock, but not using the CPU
        t0 = time.monotonic()
        second = subprocess.run(
            command("torchrun", 2) + base + ["sft.max_steps=2"], env=env(), cwd=ROOT,
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        took = time.monotonic() - t0
        assert first.poll() is None  # the first run was not disturbed
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    print(f"second launch (torchrun, 2 ranks) refused and gone in {took:.1f} s")
    err = second.stderr
    refusals = [x for x in err.splitlines() if x.startswith("train_sft.py: error: ")]
    assert len(refusals) == 1, err[-3000:]
    holder = f"pid {first.pid} on host {socket.gethostname()}"
    assert f"RunLockError: --output-dir {out} is in use by another run: {holder}" in refusals[0]
    assert "exitcode  : 2" in err, err[-3000:]  # torchrun's report of the refused ranks
    assert second.returncode != 0 and took < 90, (second.returncode, took)
    acquire(out).release()  # the SIGKILLed first run's lock went with it
