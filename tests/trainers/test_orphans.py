"""Workers die with their launcher: a SIGKILLed torchrun leaves no rank training.

torchrun starts each worker in a POSIX session of its own, so killing torchrun (alone, as an OOM
killer or a scheduler would) used to leave both ranks training and committing checkpoints.
Workers now ask the kernel for SIGKILL on their parent's death (PR_SET_PDEATHSIG, Linux), or
poll their parent pid from a thread where prctl is missing. Measured here: both workers gone
within 0.1 s of torchrun's death; the bound asserted is 5 s.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.trainers.common import ROOT, env
from tests.trainers.test_hang import alive, kill_all, launch, steps_done, workers

BOUND_S = 5.0

# A worker (RANK set) that guards itself and then idles; its parent prints its pid and dies.
WORKER = """
import sys, time
sys.path.insert(0, {root!r})
import tools.train_common as tc
if sys.argv[1] == "watchdog":
    tc._set_pdeathsig = lambda sig: False  # as where prctl is unavailable
print(tc.exit_with_launcher(interval=0.05), flush=True)
time.sleep(120)
"""
LAUNCHER = """
import os, subprocess, sys
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True, env=dict(os.environ, RANK="0"),
                         start_new_session=True)
print(child.pid, child.stdout.readline().strip(), flush=True)
os._exit(0)
"""


def _gone_after(pids: list[int], t0: float) -> float:
    """Seconds from `t0` until every pid is dead (gives up BOUND_S + 10 s after t0)."""
    while any(alive(p) for p in pids) and time.monotonic() - t0 < BOUND_S + 10:
        time.sleep(0.01)
    return time.monotonic() - t0


@pytest.mark.parametrize("guard", ["pdeathsig", "watchdog"])
def test_worker_dies_with_its_parent(guard):
    proc = subprocess.run(
        [sys.executable, "-c", LAUNCHER, WORKER.format(root=str(ROOT)), guard],
        capture_output=True, text=True, timeout=60, env=env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    pid, how = proc.stdout.split()
    try:
        assert how == guard
        took = _gone_after([int(pid)], time.monotonic())  # its parent is already gone
        assert took < BOUND_S, f"worker {pid} outlived its parent by {took:.1f} s"
    finally:
        kill_all([int(pid)])


def test_plain_process_is_not_guarded():
    """A run started without a launcher (no RANK) outlives its shell, as `nohup` wants."""
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); import tools.train_common as tc; "
    code += "print(tc.exit_with_launcher())"
    e = env()
    e.pop("RANK", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e)
    assert out.stdout.strip() == "none", out.stderr


@pytest.mark.timeout(180)
def test_sigkilled_torchrun_takes_its_workers(tmp_path):
    out = tmp_path / "run"
    proc, log = launch(out, ["sft.max_steps=400"])
    pids = {}
    try:
        deadline = time.monotonic() + 120
        while steps_done(out) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        pids = workers(proc)
        t0 = time.monotonic()
        os.kill(proc.pid, signal.SIGKILL)  # torchrun alone: its workers are in other sessions
        proc.wait(timeout=30)
        took = _gone_after(list(pids.values()), t0)
        print(f"workers gone {took:.2f} s after torchrun's SIGKILL")
        assert took < BOUND_S, f"workers {pids} outlived torchrun by {took:.1f} s"
        steps = steps_done(out)
        time.sleep(1.0)
        assert steps_done(out) == steps  # nobody is training any more
    finally:
        kill_all(list(pids.values()) + [proc.pid])
