"""The demo's pinned CPU code paths (megarlhf.demo.repro): the same fp32 computation gives the
same bits whatever ISA, MKL branch or thread count the environment would otherwise select, which
it does not unpinned (how the demo's README numbers came to differ between machines)."""

import os
import subprocess
import sys
from pathlib import Path

from megarlhf.demo import data as demo_data
from megarlhf.demo import repro

ROOT = Path(__file__).resolve().parents[2]
# Environments that stand in for other machines: another MKL branch, another ATen ISA and thread
# count.
OTHER = ({"MKL_CBWR": "COMPATIBLE"}, {"ATEN_CPU_CAPABILITY": "avx2", "OMP_NUM_THREADS": "1"})


def _fingerprint(pinned: bool, extra: dict) -> str:
    code = "from megarlhf.demo import repro\n"
    code += "repro.pin()\n" if pinned else ""
    code += "print(repro.fingerprint())"
    env = {k: v for k, v in os.environ.items() if k not in repro.PINNED_ENV}
    env.update({"OMP_NUM_THREADS": "2", **extra})
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_pinned_paths_give_the_same_bits():
    unpinned = {_fingerprint(False, m) for m in ({}, OTHER[0])}
    assert len(unpinned) > 1  # the paths do change the bits here
    pinned = {_fingerprint(True, m) for m in ({}, *OTHER)}
    assert len(pinned) == 1


def test_pin_sets_and_reports():
    env = {"MKL_CBWR": "AUTO"}
    old = repro.pin(env)
    assert env == {**env, **repro.PINNED_ENV}
    assert old["MKL_CBWR"] == "AUTO" and old["ATEN_CPU_CAPABILITY"] is None


def test_seed_overrides(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("include: m.yaml\ndata:\n  seed: 2\nsft:\n  seed: 3\n  epochs: 1\nx: 4\n")
    assert demo_data.seed_overrides(cfg, 0) == []
    assert demo_data.seed_overrides(cfg, 2) == ["data.seed=2002", "sft.seed=2003"]
