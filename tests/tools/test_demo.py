"""The demo's quick variant end to end (tools/demo.py --quick): every stage runs through the
tools, the report exists with every number, the reward model beats chance and PPO raises the
training labeler's score over SFT. The full run's targets are in README / docs/demo.md."""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KEYS = (
    "winrate_ppo_vs_sft_heldout", "winrate_ppo_ptx_vs_sft_heldout", "winrate_ppo_vs_sft_train",
    "rm_accuracy_heldout_train_labeler", "rm_accuracy_heldout_heldout_labeler",
    "ppl_sft", "ppl_ppo", "ppl_ppo_ptx", "kl_ppo_from_sft", "kl_ppo_ptx_from_sft",
)  # fmt: skip


def test_quick_demo_runs_and_learns(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "tools/demo.py", "--quick", "--quiet", "--output-dir", str(out)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=840)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    for k in KEYS:
        assert math.isfinite(rep[k]), k
    for f in ("winrates.png", "ppo_curves.png", "rm_accuracy.png"):
        assert (out / "figures" / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "Win rate against SFT" in md and f"{rep['ppl_sft']:.2f}" in md
    # The reward model beats chance on held-out comparisons (VADER's own preference).
    assert rep["rm_accuracy_heldout_train_labeler"] > 0.55
    assert rep["rm_accuracy_heldout_train_labeler_pairs"] >= 100
    # PPO raises the training labeler's score over SFT on held-out prompts.
    assert rep["mean_vader_ppo"] > rep["mean_vader_sft"]
    assert rep["winrate_ppo_vs_sft_train"] > 0.5
    # The report's numbers are those of its samples.
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == rep["eval_prompts"]
    wins = sum(
        (r["vader_ppo"] > r["vader_sft"]) + 0.5 * (r["vader_ppo"] == r["vader_sft"]) for r in rows
    )
    assert abs(wins / len(rows) - rep["winrate_ppo_vs_sft_train"]) < 1e-9
