"""The demo's evaluation, as in the paper: win rates against SFT under both labelers, RM pair
accuracy on held-out comparisons, the alignment tax (held-out perplexity) and KL from SFT.

Everything is measured on held-out prompts (clauses never seen in pre-training, SFT, comparisons
or PPO). Each policy (SFT, PPO, PPO-ptx) samples one continuation per prompt at temperature 1 (the
PPO training distribution) with the same seed; a labeler compares the PPO (or PPO-ptx) and the SFT
continuation of the same prompt (a tie counts one half). KL from SFT is the mean over samples of
sum_t log pi(y_t) - log pi_SFT(y_t) on the policy's own samples. Perplexity is on held-out corpus
text (`data/eval_text.txt`, disjoint from the PTX text). RM accuracy counts the held-out
comparison pairs a labeler orders strictly: against VADER itself (the training labeler's
preference), a noisy VADER draw (the labels a training labeler would give, as in the paper's
held-out comparisons) and TextBlob (the held-out labeler).

Writes report.json, report.md, samples.jsonl and figures/*.png in the run folder.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from megarlhf.config import GenerationConfig
from megarlhf.data.tokenizer import load_tokenizer
from megarlhf.eval import labelers
from megarlhf.eval.lm import load_model, perplexity, response_logprobs, reward_scores, sample

POLICIES = {"sft": "SFT", "ppo": "PPO", "ppo_ptx": "PPO-ptx"}
LABELER_NAMES = {"vader": "VADER (training labeler)", "textblob": "TextBlob (held-out labeler)"}
TARGETS = {
    "winrate_ppo_vs_sft_heldout": 0.65,
    "rm_accuracy_heldout_train_labeler": 0.70,
}


def _lines(path: Path) -> list[str]:
    return [x for x in path.read_text().splitlines() if x.strip()]


def _metrics(path: Path) -> list[dict]:
    return [json.loads(x) for x in _lines(path)] if path.exists() else []


def evaluate(out: Path, cfg, timings: dict) -> dict:
    """Measure everything, write the report files; returns report.json's content."""
    out = Path(out)
    data = out / "data"
    tok = load_tokenizer(data / "tokenizer")
    prompts = [json.loads(x)["prompt"] for x in _lines(data / "eval_prompts.jsonl")]
    pids = [tok.tokenize_pair(p, None, "raw").ids for p in prompts]
    gen = GenerationConfig(max_new_tokens=cfg.max_new_tokens, temperature=1.0, seed=cfg.seed + 99)
    models = {k: load_model(str(out / k)) for k in POLICIES}
    tokens, texts = {}, {}
    for k, m in models.items():
        comps = sample(m, pids, gen, tok.eos_id, tok.pad_id)
        tokens[k] = [c.tokens for c in comps]
        texts[k] = [tok.decode([t for t in c.tokens if t != tok.eos_id]) for c in comps]
    scores = {lab: {k: fn(texts[k]) for k in POLICIES} for lab, fn in labelers.LABELERS.items()}
    rep: dict = {"eval_prompts": len(prompts)}
    for k in ("ppo", "ppo_ptx"):
        for lab, suffix in (("textblob", "heldout"), ("vader", "train")):
            rep[f"winrate_{k}_vs_sft_{suffix}"] = labelers.win_rate(
                scores[lab][k], scores[lab]["sft"]
            )
    for lab in labelers.LABELERS:
        for k in POLICIES:
            rep[f"mean_{lab}_{k}"] = float(scores[lab][k].mean())
    sft_lp = {}
    for k in ("ppo", "ppo_ptx"):
        own = response_logprobs(models[k], pids, tokens[k])
        ref = response_logprobs(models["sft"], pids, tokens[k])
        sft_lp[k] = float(np.mean([(a - b).sum() for a, b in zip(own, ref, strict=True)]))
        rep[f"kl_{k}_from_sft"] = sft_lp[k]
    rep["kl_sft_from_sft"] = 0.0
    rows = [tok.tokenize_pair("", t, "raw").ids for t in _lines(data / "eval_text.txt")]
    for k, m in models.items():
        rep[f"ppl_{k}"] = perplexity(m, rows)
    rep["eval_text_rows"] = len(rows)
    rep.update(_rm_accuracy(out, tok))
    rep["labeler"] = json.loads((data / "labeler.json").read_text())
    rep["curves"] = {k: _curve(out / k / "metrics.jsonl") for k in ("ppo", "ppo_ptx")}
    rep["timings_s"] = dict(timings)
    rep["targets"] = _targets(rep)
    samples = [
        {"prompt": p, **{k: texts[k][i] for k in POLICIES},
         **{f"{lab}_{k}": float(scores[lab][k][i]) for lab in labelers.LABELERS for k in POLICIES}}
        for i, p in enumerate(prompts)
    ]  # fmt: skip
    (out / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    (out / "report.json").write_text(json.dumps(rep, indent=1) + "\n")
    _figures(out / "figures", rep)
    (out / "report.md").write_text(render_markdown(rep, samples[: cfg.shown_samples], cfg))
    return rep


def _rm_accuracy(out: Path, tok) -> dict:
    """RM pair accuracy on the held-out comparisons under each labeler (strict pairs only)."""
    rm = load_model(str(out / "rm"))
    groups = [json.loads(x) for x in _lines(out / "data" / "comparisons_eval.jsonl")]
    model_scores = []
    for g in groups:
        p = tok.tokenize_pair(g["prompt"], None, "raw").ids
        rs = [tok.tokenize_pair(g["prompt"], r, "raw").ids[len(p) :] for r in g["responses"]]
        model_scores.append(reward_scores(rm, [p] * len(rs), rs))
    res = {}
    for key, lab in (
        ("rm_accuracy_heldout_train_labeler", "vader"),
        ("rm_accuracy_heldout_train_labeler_noisy", "noisy_vader"),
        ("rm_accuracy_heldout_heldout_labeler", "textblob"),
    ):
        acc, n = labelers.pair_accuracy(model_scores, [np.array(g[lab]) for g in groups])
        res[key], res[f"{key}_pairs"] = acc, n
    # The ceiling a noisy label allows: how often the noisy labels agree with VADER itself.
    acc, _ = labelers.pair_accuracy(
        [np.array(g["vader"]) for g in groups], [np.array(g["noisy_vader"]) for g in groups]
    )
    res["noisy_label_agreement_with_vader"] = acc
    return res


def _curve(path: Path) -> dict:
    recs = _metrics(path)
    return {
        "step": [r["step"] for r in recs],
        "reward": [r["reward_mean"] for r in recs],
        "kl": [r["kl"] for r in recs],
    }


def _targets(rep: dict) -> dict:
    t = {k: {"value": rep[k], "target": f">= {v}", "met": rep[k] >= v} for k, v in TARGETS.items()}
    tax_ptx, tax_ppo = (
        abs(rep["ppl_ppo_ptx"] - rep["ppl_sft"]),
        abs(rep["ppl_ppo"] - rep["ppl_sft"]),
    )
    t["ppl_ppo_ptx_closer_to_sft"] = {
        "value": f"|{tax_ptx:.3f}| vs |{tax_ppo:.3f}|",
        "target": "PPO-ptx's perplexity closer to SFT's than PPO's",
        "met": tax_ptx < tax_ppo,
    }
    return t


def _figures(folder: Path, rep: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for k in ("ppo", "ppo_ptx"):
        c = rep["curves"][k]
        axes[0].plot(c["step"], c["reward"], label=POLICIES[k])
        axes[1].plot(c["step"], c["kl"], label=POLICIES[k])
    axes[0].set(title="RM reward per PPO step", xlabel="PPO step", ylabel="mean RM score")
    axes[1].set(title="KL from SFT per PPO step", xlabel="PPO step", ylabel="KL (nats / sample)")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(folder / "ppo_curves.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.6))
    width = 0.38
    for j, (lab, suffix) in enumerate((("textblob", "heldout"), ("vader", "train"))):
        vals = [0.5] + [rep[f"winrate_{k}_vs_sft_{suffix}"] for k in ("ppo", "ppo_ptx")]
        xs = np.arange(3) + (j - 0.5) * width
        bars = ax.bar(xs, vals, width, label=LABELER_NAMES[lab])
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.axhline(0.5, color="gray", ls="--", lw=1)
    ax.set_xticks(np.arange(3), list(POLICIES.values()))
    ax.set(ylim=(0, 1), ylabel="win rate against SFT", title="Preference against SFT (Figure 1)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "winrates.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.4))
    names = ["VADER\n(training labeler)", "noisy VADER\n(training labels)", "TextBlob\n(held-out)"]
    vals = [
        rep["rm_accuracy_heldout_train_labeler"],
        rep["rm_accuracy_heldout_train_labeler_noisy"],
        rep["rm_accuracy_heldout_heldout_labeler"],
    ]
    bars = ax.bar(names, vals, color=["C0", "C0", "C1"])
    ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.axhline(0.5, color="gray", ls="--", lw=1, label="chance")
    ax.axhline(rep["labeler"]["agreement"], color="C3", ls=":", lw=1, label="inter-labeler")
    ax.set(ylim=(0, 1), ylabel="pair accuracy", title="Reward model on held-out comparisons")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "rm_accuracy.png", dpi=110)
    plt.close(fig)


def render_markdown(rep: dict, samples: list[dict], cfg) -> str:
    """report.md: the tables, the targets (met or not, said plainly), figures, samples."""
    lines = _md_winrates(rep) + _md_reward_model(rep) + _md_perplexity_targets(rep)
    lines += _md_figures_samples(rep, samples)
    lines += ["", f"Demo config: `{json.dumps(dataclasses.asdict(cfg))}`", ""]
    return "\n".join(lines)


def _f3(x: float) -> str:
    return f"{x:.3f}"


def _md_winrates(rep: dict) -> list[str]:
    lab = rep["labeler"]
    lines = [
        "# InstructGPT in miniature: report",
        "",
        f"{rep['eval_prompts']} held-out prompts, one sample per policy at temperature 1. "
        f"Training labeler: VADER compound + N(0, {lab['sigma']:.3f}^2) per judgement "
        f"(two such labelers agree on {lab['agreement']:.1%} of pairs; the paper: 72.6%). "
        "Held-out labeler: TextBlob polarity. A tie counts one half.",
        "",
        "## Win rate against SFT",
        "",
        "| policy | held-out labeler (TextBlob) | training labeler (VADER) | KL from SFT |",
        "|---|---|---|---|",
        "| SFT | 0.500 | 0.500 | 0.000 |",
    ]
    for k in ("ppo", "ppo_ptx"):
        lines.append(
            f"| {POLICIES[k]} | {_f3(rep[f'winrate_{k}_vs_sft_heldout'])} | "
            f"{_f3(rep[f'winrate_{k}_vs_sft_train'])} | {_f3(rep[f'kl_{k}_from_sft'])} |"
        )
    lines += ["", "Mean labeler scores of the samples:", "", "| policy | VADER | TextBlob |"]
    lines.append("|---|---|---|")
    for k, name in POLICIES.items():
        v, t = rep[f"mean_vader_{k}"], rep[f"mean_textblob_{k}"]
        lines.append(f"| {name} | {_f3(v)} | {_f3(t)} |")
    return lines


def _md_reward_model(rep: dict) -> list[str]:
    return [
        "",
        "## Reward model: pair accuracy on held-out comparisons",
        "",
        "| labels | accuracy | pairs |",
        "|---|---|---|",
        f"| VADER (training labeler's own preference) | "
        f"{_f3(rep['rm_accuracy_heldout_train_labeler'])} | "
        f"{rep['rm_accuracy_heldout_train_labeler_pairs']} |",
        f"| noisy VADER (labels as a training labeler gives them) | "
        f"{_f3(rep['rm_accuracy_heldout_train_labeler_noisy'])} | "
        f"{rep['rm_accuracy_heldout_train_labeler_noisy_pairs']} |",
        f"| TextBlob (held-out labeler) | {_f3(rep['rm_accuracy_heldout_heldout_labeler'])} | "
        f"{rep['rm_accuracy_heldout_heldout_labeler_pairs']} |",
        "",
        f"The paper: 72.4% on training labelers, 69.6% on held-out labelers. Here the noisy labels "
        f"agree with VADER itself on {rep['noisy_label_agreement_with_vader']:.1%} of the pairs, "
        "the ceiling for accuracy against noisy labels. Pairs a labeler ties are not counted.",
    ]


def _md_perplexity_targets(rep: dict) -> list[str]:
    lines = ["", "## Alignment tax: perplexity on held-out corpus text", ""]
    lines += ["| policy | perplexity |", "|---|---|"]
    for k, name in POLICIES.items():
        lines.append(f"| {name} | {rep[f'ppl_{k}']:.2f} |")
    lines += ["", "## Targets", "", "| target | value | met |", "|---|---|---|"]
    for k, t in rep["targets"].items():
        v = t["value"] if isinstance(t["value"], str) else _f3(t["value"])
        lines.append(f"| {k} {t['target']} | {v} | {'yes' if t['met'] else '**NO**'} |")
    missed = [k for k, t in rep["targets"].items() if not t["met"]]
    lines += ["", f"Missed: {', '.join(missed)}." if missed else "All targets met."]
    return lines


def _md_figures_samples(rep: dict, samples: list[dict]) -> list[str]:
    lines = ["", "## Figures", "", "![win rates](figures/winrates.png)", ""]
    lines += [
        "![PPO curves](figures/ppo_curves.png)",
        "",
        "![RM accuracy](figures/rm_accuracy.png)",
    ]
    lines += ["", "## Samples (held-out prompts)", "", "| prompt | SFT | PPO | PPO-ptx |"]
    lines.append("|---|---|---|---|")
    for s in samples:
        cells = [s["prompt"]] + [
            f"{s[k]} ({s[f'vader_{k}']:+.2f} / {s[f'textblob_{k}']:+.2f})" for k in POLICIES
        ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines += ["", "(VADER / TextBlob scores in parentheses.)", "", "## Stage times (s)", ""]
    lines.append(
        ", ".join(f"{k} {v:.0f}" for k, v in rep["timings_s"].items())
        + " (the evaluation itself is not included)."
    )
    return lines
