"""The demo's quick variant end to end (tools/demo.py --quick --kl-sweep 0.01): every stage runs
through the tools, the report exists with every number, the reward model beats chance and PPO
raises the training labeler's score over SFT, DPO has its row, the sweep's PPO run gives the
frontier. Which stages a later call runs (`--kl-sweep` on a finished folder: only the sweep's new
runs and the evaluation) is checked without training, on the stage driver itself. The full run's
targets are in README / docs/demo.md."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megarlhf.demo.data import STAGES, DemoConfig, main_kl_coef

ROOT = Path(__file__).resolve().parents[2]
KEYS = (
    "winrate_ppo_vs_sft_heldout", "winrate_ppo_ptx_vs_sft_heldout", "winrate_ppo_vs_sft_train",
    "rm_accuracy_heldout_train_labeler", "rm_accuracy_heldout_heldout_labeler",
    "ppl_sft", "ppl_ppo", "ppl_ppo_ptx", "kl_ppo_from_sft", "kl_ppo_ptx_from_sft",
    "winrate_dpo_vs_sft_heldout", "ppl_dpo", "kl_dpo_from_sft",
)  # fmt: skip


def _demo(out, *extra):
    cmd = [sys.executable, "tools/demo.py", "--quick", "--quiet", "--output-dir", str(out), *extra]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=840)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def test_quick_demo_runs_and_learns(tmp_path):
    out = tmp_path / "demo"
    _demo(out, "--kl-sweep", "0.01")
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
    assert "| DPO |" in md
    _check_sweep(out, rep)


def _check_sweep(out, rep):
    """`--kl-sweep 0.01`: one PPO run more (the main run stands for its own beta), the frontier
    in report.json, report.md and a figure."""
    assert "kl_sweep" in json.loads((out / "timings.json").read_text())
    points = {p["beta"]: p for p in rep["kl_frontier"]}
    main_beta = [b for b in points if b != 0.01]
    assert 0.01 in points and len(main_beta) == 1, points
    main = points[main_beta[0]]
    # The main PPO run's point is the PPO row's numbers (the same samples).
    assert main["winrate_heldout"] == rep["winrate_ppo_vs_sft_heldout"]
    assert main["kl"] == rep["kl_ppo_from_sft"]
    for p in points.values():
        assert math.isfinite(p["kl"]) and 0 <= p["winrate_heldout"] <= 1, p
    assert (out / "kl_sweep" / "beta_0.01" / "metrics.jsonl").is_file()
    assert (out / "figures" / "kl_frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "frontier" in (out / "report.md").read_text().lower()


@pytest.fixture(scope="module")
def demo_tool():
    """tools/demo.py as a module; importing it pins the CPU paths in os.environ (for the tools it
    starts), which is undone here so later tests' subprocesses are not affected."""
    saved = dict(os.environ)
    try:
        from tools import demo
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return demo


def _stages_run(demo_tool, out, sweep=()) -> list:
    """What `Demo.run()` executes in `out`: every stage method is replaced by a recorder (the
    evaluation also writes the report run() returns), except the sweep's own, which runs with
    its PPO runs recorded."""
    calls = []
    d = demo_tool.Demo(DemoConfig.quick(), out, quiet=True, kl_sweep=sweep)
    for stage in STAGES:
        if stage != "kl_sweep":
            setattr(d, f"stage_{stage}", lambda s=stage: calls.append(s))
    evaluate = d.stage_evaluate
    d.stage_evaluate = lambda: (evaluate(), (out / "report.json").write_text("{}"))
    d._ppo = lambda run, ptx, *overrides: calls.append((run, ptx, *overrides))
    d.run()
    return calls


def test_a_later_call_runs_only_what_it_lacks(demo_tool, tmp_path):
    """A fresh folder runs every stage but the sweep; `--kl-sweep 0.01` on the finished folder
    runs one PPO and the evaluation; the same call again runs nothing; a widened sweep runs only
    its new coefficient (the main run's coefficient is the main PPO run, never retrained)."""
    out = tmp_path / "demo"
    assert _stages_run(demo_tool, out) == [s for s in STAGES if s != "kl_sweep"]
    sweep = [("kl_sweep/beta_0.01", 0.0, "ppo.kl_coef=0.01"), "evaluate"]
    assert _stages_run(demo_tool, out, (0.01,)) == sweep
    assert _stages_run(demo_tool, out, (0.01,)) == []
    main = main_kl_coef(demo_tool.ROOT / "configs" / "demo" / "ppo.yaml")
    widened = _stages_run(demo_tool, out, (0.01, 0.02, main))
    assert widened == [("kl_sweep/beta_0.02", 0.0, "ppo.kl_coef=0.02"), "evaluate"]
    index = json.loads((out / "kl_sweep.json").read_text())
    assert index == {repr(main): "ppo", "0.01": "kl_sweep/beta_0.01", "0.02": "kl_sweep/beta_0.02"}
