"""The golden runs (tests/golden/runs.py) give the stored metrics and bitwise the stored weights.

The records were made by the tree before a refactor; a run that differs names the first metric
that moved and the tensors whose bytes changed, with their norms, so a deliberate numerical change
can be told from a mistake. Re-record with `python -m tests.golden.runs` only for a change that is
meant to move the numbers, and say so in its commit.
"""

from __future__ import annotations

import json

from tests.golden.runs import RUNS, golden_path, run_all


def _first_metric_difference(want: list[dict], got: list[dict]) -> str | None:
    if len(want) != len(got):
        return f"{len(got)} metric records, stored {len(want)}"
    for w, g in zip(want, got, strict=True):
        if w != g:
            keys = sorted(k for k in set(w) | set(g) if w.get(k) != g.get(k))
            k = keys[0]
            return f"step {w.get('step')}: {k} = {g.get(k)!r}, stored {w.get(k)!r} ({keys})"
    return None


def _weight_differences(want: dict, got: dict) -> list[str]:
    out = []
    for name in sorted(set(want) | set(got)):
        w, g = want.get(name), got.get(name)
        if w is None or g is None:
            out.append(f"{name}: {'missing' if g is None else 'unexpected'}")
        elif w["sha256"] != g["sha256"] or w["dtype"] != g["dtype"]:
            out.append(f"{name}: norm {g['norm']!r}, stored {w['norm']!r}")
    return out


def test_golden_runs_are_unchanged(tmp_path):
    got = run_all(list(RUNS), tmp_path)
    problems = []
    for name, rec in got.items():
        want = json.loads(golden_path(name).read_text())
        assert rec["command"] == want["command"], name
        diff = _first_metric_difference(want["metrics"], rec["metrics"])
        if diff:
            problems.append(f"{name}: {diff}")
        for model in ("model", "critic"):
            bad = _weight_differences(want.get(model, {}), rec.get(model, {}))
            if bad:
                problems.append(f"{name} {model}: {len(bad)} tensors differ, e.g. {bad[:3]}")
    assert not problems, "\n".join(problems)
