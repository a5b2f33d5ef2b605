"""tools/bench_lora_memory.py: one JSON line with full fine-tuning's and LoRA's peak RSS (a tiny
model here, so the numbers are small; the SmolLM2-135M record is in docs/lora.md), and bad input
as one line with exit 2."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.trainers.common import env

ROOT = Path(__file__).resolve().parents[2]
TOOL = str(ROOT / "tools" / "bench_lora_memory.py")


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env())  # fmt: skip


@pytest.mark.timeout(320)
def test_one_json_line_with_both_peaks():
    proc = _run("--model", "tiny_gpt2", "--ranks", "4", "--steps", "1", "--seq-len", "32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = proc.stdout.strip().splitlines()
    out = json.loads(line)
    full, lora = out["full"], out["lora_r4"]
    # tiny_gpt2: 2 layers, h 64, MLP 256; r = 4 on every linear is 2 x 4 x (256 + 128 + 320 + 320).
    assert full["trained"] == full["params"] and lora["trained"] == 2 * 4 * 1024
    assert lora["params"] == full["params"] + lora["trained"]
    for rec in (full, lora):
        assert rec["peak_rss"] > rec["model_peak"] > 0 and rec["predicted"] > 0
    assert out["ratio_r4"] == pytest.approx(lora["model_peak"] / full["model_peak"], abs=1e-4)
    assert math.isfinite(out["rss_ratio_r4"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ranks", "x"], "--ranks: 'x' is not a list of integers"),
        (["--ranks", "0"], "--ranks: must be integers >= 1"),
        (["--targets", "lm_head"], "target_modules: ['lm_head'] not among"),
    ],
)
def test_bad_input_is_one_line(args, message):
    proc = _run(*args, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.startswith("bench_lora_memory.py: error:")
