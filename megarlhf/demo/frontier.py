"""The reward over-optimization frontier (Gao et al., 2022): PPO runs from the same SFT and RM at
several KL coefficients, each judged by the held-out labeler (the gold reward) and by the RM it was
trained on (the proxy), both plotted against sqrt(KL from SFT).

A frontier point is `{beta, kl, winrate_heldout, winrate_train, rm_score}`: the KL coefficient,
the mean KL from SFT of the policy's held-out samples (nats per response), its win rate against
SFT under TextBlob (held out) and VADER (the training labeler), and the RM's mean score of the
samples. Pure functions of the points, except `figure`, which draws them.
"""

from __future__ import annotations

from pathlib import Path

# The target the main demo's sweep is held to: a setting this good, this close to SFT.
FRONTIER_TARGET_WINRATE = 0.70
FRONTIER_TARGET_KL = 6.0


def best_point(points: list[dict]) -> dict:
    """The point whose held-out win rate is highest (the smaller KL on a tie)."""
    return max(points, key=lambda p: (p["winrate_heldout"], -p["kl"]))


def target_point(points: list[dict]) -> dict | None:
    """The best held-out win rate among points with KL <= FRONTIER_TARGET_KL, or None."""
    near = [p for p in points if p["kl"] <= FRONTIER_TARGET_KL]
    return best_point(near) if near else None


def parting(points: list[dict], sft_rm_score: float) -> dict:
    """Where the proxy and gold curves part, walking out in KL from SFT (win rate 0.5, the SFT RM
    score): the last point where the held-out win rate still rose, the points after it, and
    whether the RM score kept rising past it. `kind` is "parted" (gold falls while the proxy
    rises), "both_fall" (both fall past the peak), or "not_within" (gold still rising at the
    largest KL swept)."""
    pts = sorted(points, key=lambda p: p["kl"])
    origin = {"beta": None, "kl": 0.0, "winrate_heldout": 0.5, "rm_score": sft_rm_score}
    path = [origin, *pts]
    peak = max(range(len(path)), key=lambda i: (path[i]["winrate_heldout"], -i))
    after = path[peak + 1 :]
    if not after:
        return {"kind": "not_within", "peak": path[peak], "after": []}
    rising_proxy = max(p["rm_score"] for p in after) > path[peak]["rm_score"]
    return {"kind": "parted" if rising_proxy else "both_fall", "peak": path[peak], "after": after}


def describe(points: list[dict], sft_rm_score: float) -> str:
    """One paragraph for the report: the best coefficient and where proxy and gold part."""
    best = best_point(points)
    p = parting(points, sft_rm_score)
    peak, after = p["peak"], p["after"]
    text = (
        f"The held-out win rate is highest at beta = {best['beta']:g} "
        f"({best['winrate_heldout']:.3f} at KL {best['kl']:.2f} nats, sqrt(KL) "
        f"{best['kl'] ** 0.5:.2f}). "
    )
    if p["kind"] == "not_within":
        return text + (
            "Within this sweep the curves do not part: the held-out win rate still rises at the "
            f"largest KL swept ({peak['kl']:.2f} nats); a smaller coefficient would show where it "
            "turns."
        )
    last = after[-1]
    where = f"past sqrt(KL) = {peak['kl'] ** 0.5:.2f} (KL {peak['kl']:.2f} nats)"
    if p["kind"] == "parted":
        top = max(after, key=lambda q: q["rm_score"])
        return text + (
            f"The proxy and the gold reward part {where}: from there the RM's score keeps rising "
            f"({peak['rm_score']:+.3f} to {top['rm_score']:+.3f}) while the held-out labeler's "
            f"win rate falls ({peak['winrate_heldout']:.3f} to {last['winrate_heldout']:.3f} at "
            f"KL {last['kl']:.2f}): beyond it PPO optimizes what the RM rewards but TextBlob does "
            "not."
        )
    return text + (
        f"Past its peak ({where}) both the held-out win rate and the RM's score fall "
        f"({peak['winrate_heldout']:.3f} to {last['winrate_heldout']:.3f}; "
        f"{peak['rm_score']:+.3f} to {last['rm_score']:+.3f}): the proxy does not run ahead of "
        "the gold reward in this sweep."
    )


def markdown(points: list[dict], sft_rm_score: float) -> list[str]:
    """The report's frontier section: the table, the figure and `describe`'s paragraph."""
    lines = [
        "",
        "## Over-optimization frontier: PPO at several KL coefficients",
        "",
        "The same SFT policy and RM, PPO with each KL coefficient beta; KL from SFT measured on "
        "the held-out samples (nats per response). Gold: the held-out labeler; proxy: the RM.",
        "",
        "| beta | KL from SFT | sqrt(KL) | win rate, held-out labeler | win rate, training "
        "labeler | RM score |",
        "|---|---|---|---|---|---|",
        f"| SFT | 0.000 | 0.000 | 0.500 | 0.500 | {sft_rm_score:+.3f} |",
    ]
    for p in sorted(points, key=lambda q: q["beta"], reverse=True):
        lines.append(
            f"| {p['beta']:g} | {p['kl']:.3f} | {p['kl'] ** 0.5:.3f} | "
            f"{p['winrate_heldout']:.3f} | {p['winrate_train']:.3f} | {p['rm_score']:+.3f} |"
        )
    lines += ["", describe(points, sft_rm_score), "", "![KL frontier](figures/kl_frontier.png)"]
    return lines


def figure(path: Path, points: list[dict], sft_rm_score: float, title: str) -> None:
    """Held-out and training-labeler win rates (left axis) and the RM score (right axis) against
    sqrt(KL from SFT), SFT at the origin, each point labelled with its beta."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted(points, key=lambda p: p["kl"])
    xs = [0.0] + [p["kl"] ** 0.5 for p in pts]
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    gold = [0.5] + [p["winrate_heldout"] for p in pts]
    train = [0.5] + [p["winrate_train"] for p in pts]
    ax.plot(xs, gold, "o-", color="C1", label="win rate, held-out labeler (gold)")
    ax.plot(xs, train, "s--", color="C0", alpha=0.6, label="win rate, training labeler")
    for x, y, p in zip(xs[1:], gold[1:], pts, strict=True):
        ax.annotate(f"{p['beta']:g}", (x, y), textcoords="offset points", xytext=(3, -11), size=7)
    ax.axhline(0.5, color="gray", lw=0.8, ls=":")
    ax.set(xlabel="sqrt(KL from SFT)  (sqrt nats)", ylabel="win rate against SFT", title=title)
    ax2 = ax.twinx()
    ax2.plot(xs, [sft_rm_score] + [p["rm_score"] for p in pts], "^-", color="C2", label="RM score")
    ax2.set_ylabel("RM score (proxy)")
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
    ax.legend(lines, labels, fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
