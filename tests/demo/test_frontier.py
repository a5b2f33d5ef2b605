"""The over-optimization frontier's arithmetic (megarlhf.demo.frontier) on hand-made points: the
best coefficient, the KL-bounded target point, where proxy and gold part, and the figure."""

from megarlhf.demo import frontier


def _pt(beta, kl, win, rm):
    return {"beta": beta, "kl": kl, "winrate_heldout": win, "winrate_train": win, "rm_score": rm}


# Gold rises to beta=0.05 (KL 4) then falls while the RM score keeps rising: they part at KL 4.
PARTED = [_pt(0.2, 1.0, 0.60, 0.2), _pt(0.05, 4.0, 0.72, 0.5), _pt(0.01, 9.0, 0.66, 0.9)]


def test_best_and_target_points():
    assert frontier.best_point(PARTED)["beta"] == 0.05
    assert frontier.target_point(PARTED)["beta"] == 0.05
    # Only points at KL <= 6 count for the target; none here.
    assert frontier.target_point([_pt(0.01, 9.0, 0.9, 1.0)]) is None
    # A tie in win rate goes to the smaller KL.
    tie = [_pt(0.1, 2.0, 0.7, 0.1), _pt(0.02, 5.0, 0.7, 0.3)]
    assert frontier.best_point(tie)["beta"] == 0.1


def test_parting_kinds():
    p = frontier.parting(PARTED, sft_rm_score=0.0)
    assert p["kind"] == "parted" and p["peak"]["beta"] == 0.05
    assert [q["beta"] for q in p["after"]] == [0.01]
    text = frontier.describe(PARTED, 0.0)
    assert "part past sqrt(KL) = 2.00 (KL 4.00 nats)" in text
    assert "+0.500 to +0.900" in text and "0.720 to 0.660" in text
    # Both fall past the peak.
    both = [_pt(0.1, 1.0, 0.7, 0.5), _pt(0.01, 4.0, 0.6, 0.3)]
    assert frontier.parting(both, 0.0)["kind"] == "both_fall"
    # Still rising at the largest KL: the sweep does not reach the parting.
    rising = [_pt(0.1, 1.0, 0.6, 0.2), _pt(0.01, 4.0, 0.7, 0.4)]
    assert frontier.parting(rising, 0.0)["kind"] == "not_within"
    assert "do not part" in frontier.describe(rising, 0.0)
    # SFT itself (win 0.5 at KL 0) is the peak when every policy loses to it.
    worse = [_pt(0.1, 1.0, 0.4, 0.2)]
    assert frontier.parting(worse, 0.0)["peak"]["beta"] is None


def test_markdown_and_figure(tmp_path):
    lines = frontier.markdown(PARTED, -0.1)
    assert "| SFT | 0.000 | 0.000 | 0.500 | 0.500 | -0.100 |" in lines
    assert "| 0.05 | 4.000 | 2.000 | 0.720 | 0.720 | +0.500 |" in lines
    # Rows go from the largest coefficient (closest to SFT) down.
    betas = [ln.split(" | ")[0][2:] for ln in lines if ln.startswith("| 0.")]
    assert betas == ["0.2", "0.05", "0.01"]
    path = tmp_path / "f" / "kl_frontier.png"
    frontier.figure(path, PARTED, -0.1, "t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
