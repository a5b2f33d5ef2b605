"""The demo's evaluation, as in the paper: win rates against SFT under both labelers, RM pair
accuracy on held-out comparisons, the alignment tax (held-out perplexity) and KL from SFT.

Everything is measured on held-out prompts (clauses never seen in pre-training, SFT, comparisons
or PPO). Each policy (SFT, PPO, PPO-ptx, DPO, and the KL sweep's PPO runs) samples one
continuation per prompt at temperature 1 (the PPO training distribution) with the same seed; a
labeler compares a policy's and the SFT continuation of the same prompt (a tie counts one half).
KL from SFT is the mean over samples of sum_t log pi(y_t) - log pi_SFT(y_t) on the policy's own
samples; the RM score is the reward model's mean score of them (PPO's reward, before the KL
penalty). Perplexity is on held-out corpus
text (`data/eval_text.txt`, disjoint from the PTX text). RM accuracy counts the held-out
comparison pairs a labeler orders strictly: against VADER itself (the training labeler's
preference), a noisy VADER draw (the labels a training labeler would give, as in the paper's
held-out comparisons) and TextBlob (the held-out labeler).

Writes report.json, report.md, samples.jsonl and figures/*.png in the run folder (with the sweep,
`kl_frontier` in report.json and figures/kl_frontier.png: see megarlhf.demo.frontier).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megarlhf.config import GenerationConfig
from megarlhf.data.tokenizer import load_tokenizer
from megarlhf.demo import frontier, repro
from megarlhf.eval import labelers
from megarlhf.eval.lm import load_model, perplexity, response_logprobs, reward_scores, sample

POLICIES = {"sft": "SFT", "ppo": "PPO", "ppo_ptx": "PPO-ptx", "dpo": "DPO"}
TUNED = ("ppo", "ppo_ptx", "dpo")
LABELER_NAMES = {"vader": "VADER (training labeler)", "textblob": "TextBlob (held-out labeler)"}
TARGETS = {
    "winrate_ppo_vs_sft_heldout": 0.65,
    "rm_accuracy_heldout_train_labeler": 0.70,
}


def _lines(path: Path) -> list[str]:
    return [x for x in path.read_text().splitlines() if x.strip()]


def _metrics(path: Path) -> list[dict]:
    return [json.loads(x) for x in _lines(path)] if path.exists() else []


@dataclass
class EvalContext:
    """What every policy is measured with: the held-out prompts, the sampling settings, the SFT
    policy (the KL reference) and the reward model."""

    tok: object
    prompts: list[str]
    pids: list[list[int]]
    gen: GenerationConfig
    sft: object
    rm: object


@dataclass
class PolicySamples:
    """One policy's held-out samples and their measurements."""

    tokens: list[list[int]]
    texts: list[str]
    scores: dict  # labeler name -> per-sample scores
    rm_scores: np.ndarray
    kl: float  # mean over samples of sum_t log pi(y_t) - log pi_SFT(y_t)


def measure_policy(
    model, ctx: EvalContext, is_sft: bool = False, sampled_logprobs: bool = False
) -> PolicySamples:
    """Sample one response per held-out prompt; labeler scores, RM scores, KL from SFT.

    KL from SFT is the mean over samples of sum_t [log pi(y_t) - log pi_SFT(y_t)]: pi_SFT's
    log-probs from a forward pass; the policy's from a forward pass too, or with
    `sampled_logprobs` the ones its decoding computed while sampling (at temperature 1 those
    are the policy's own; one forward pass fewer, equal up to the decode path's rounding)."""
    tok = ctx.tok
    comps = sample(model, ctx.pids, ctx.gen, tok.eos_id, tok.pad_id)
    tokens = [c.tokens for c in comps]
    texts = [tok.decode([t for t in c.tokens if t != tok.eos_id]) for c in comps]
    scores = {lab: fn(texts) for lab, fn in labelers.LABELERS.items()}
    rm_scores = reward_scores(ctx.rm, ctx.pids, tokens)
    kl = 0.0
    if not is_sft:
        if sampled_logprobs and ctx.gen.temperature == 1.0:
            own = [np.asarray(c.logprobs, dtype=np.float64) for c in comps]
        else:
            own = response_logprobs(model, ctx.pids, tokens)
        ref = response_logprobs(ctx.sft, ctx.pids, tokens)
        kl = float(np.mean([(a - b).sum() for a, b in zip(own, ref, strict=True)]))
    return PolicySamples(tokens, texts, scores, rm_scores, kl)


def _context(out: Path, cfg) -> EvalContext:
    tok = load_tokenizer(out / "data" / "tokenizer")
    prompts = [json.loads(x)["prompt"] for x in _lines(out / "data" / "eval_prompts.jsonl")]
    pids = [tok.tokenize_pair(p, None, "raw").ids for p in prompts]
    gen = GenerationConfig(max_new_tokens=cfg.max_new_tokens, temperature=1.0, seed=cfg.seed + 99)
    sft, rm = load_model(str(out / "sft")), load_model(str(out / "rm"))
    return EvalContext(tok, prompts, pids, gen, sft, rm)


def evaluate(out: Path, cfg, timings: dict) -> dict:
    """Measure everything, write the report files; returns report.json's content."""
    out = Path(out)
    ctx = _context(out, cfg)
    models = {k: ctx.sft if k == "sft" else load_model(str(out / k)) for k in POLICIES}
    res = {k: measure_policy(m, ctx, is_sft=k == "sft") for k, m in models.items()}
    rep: dict = {"eval_prompts": len(ctx.prompts)}
    rep.update(_policy_numbers(res))
    rows = [ctx.tok.tokenize_pair("", t, "raw").ids for t in _lines(out / "data" / "eval_text.txt")]
    for k, m in models.items():
        rep[f"ppl_{k}"] = perplexity(m, rows)
    rep["eval_text_rows"] = len(rows)
    rep.update(_rm_accuracy(out, ctx.tok, ctx.rm))
    rep["labeler"] = json.loads((out / "data" / "labeler.json").read_text())
    rep["curves"] = {k: _curve(out / k / "metrics.jsonl") for k in ("ppo", "ppo_ptx")}
    sweep = _sweep(out, ctx, res)
    if sweep:
        rep["kl_frontier"] = sweep
    rep["timings_s"] = dict(timings)
    rep["cpu_fingerprint"] = repro.fingerprint()
    rep["targets"] = _targets(rep)
    samples = [
        {"prompt": p, **{k: res[k].texts[i] for k in POLICIES},
         **{f"{lab}_{k}": float(res[k].scores[lab][i]) for lab in labelers.LABELERS
            for k in POLICIES}}
        for i, p in enumerate(ctx.prompts)
    ]  # fmt: skip
    (out / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    (out / "report.json").write_text(json.dumps(rep, indent=1) + "\n")
    _figures(out / "figures", rep)
    (out / "report.md").write_text(render_markdown(rep, samples[: cfg.shown_samples], cfg))
    return rep


def _policy_numbers(res: dict) -> dict:
    """Win rates against SFT under both labelers, mean labeler and RM scores, KL from SFT."""
    rep = {}
    for k in TUNED:
        for lab, suffix in (("textblob", "heldout"), ("vader", "train")):
            rep[f"winrate_{k}_vs_sft_{suffix}"] = labelers.win_rate(
                res[k].scores[lab], res["sft"].scores[lab]
            )
    for k, r in res.items():
        for lab in labelers.LABELERS:
            rep[f"mean_{lab}_{k}"] = float(r.scores[lab].mean())
        rep[f"mean_rm_{k}"] = float(r.rm_scores.mean())
        rep[f"kl_{k}_from_sft"] = r.kl
    return rep


def _sweep(out: Path, ctx: EvalContext, res: dict) -> list[dict]:
    """The frontier points of the runs in kl_sweep.json (none when the sweep did not run)."""
    index = out / "kl_sweep.json"
    if not index.exists():
        return []
    sft, points = res["sft"], []
    for beta, run in sorted(json.loads(index.read_text()).items(), key=lambda x: float(x[0])):
        r = res["ppo"] if run == "ppo" else measure_policy(load_model(str(out / run)), ctx)
        points.append({
            "beta": float(beta), "kl": r.kl, "run": run,
            "winrate_heldout": labelers.win_rate(r.scores["textblob"], sft.scores["textblob"]),
            "winrate_train": labelers.win_rate(r.scores["vader"], sft.scores["vader"]),
            "rm_score": float(r.rm_scores.mean()),
        })  # fmt: skip
    return points


def _rm_accuracy(out: Path, tok, rm) -> dict:
    """RM pair accuracy on the held-out comparisons under each labeler (strict pairs only)."""
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
    if rep.get("kl_frontier"):
        best = frontier.target_point(rep["kl_frontier"])
        win = best["winrate_heldout"] if best else float("nan")
        t["frontier_winrate_heldout_at_kl_le_6"] = {
            "value": f"{win:.3f} (beta {best['beta']:g}, KL {best['kl']:.2f})" if best else "none",
            "target": f">= {frontier.FRONTIER_TARGET_WINRATE} at KL <= "
            f"{frontier.FRONTIER_TARGET_KL:g} nats",
            "met": bool(best) and win >= frontier.FRONTIER_TARGET_WINRATE,
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
        vals = [0.5] + [rep[f"winrate_{k}_vs_sft_{suffix}"] for k in TUNED]
        xs = np.arange(len(POLICIES)) + (j - 0.5) * width
        bars = ax.bar(xs, vals, width, label=LABELER_NAMES[lab])
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.axhline(0.5, color="gray", ls="--", lw=1)
    ax.set_xticks(np.arange(len(POLICIES)), list(POLICIES.values()))
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
    if rep.get("kl_frontier"):
        title = "Reward over-optimization: gold vs proxy"
        frontier.figure(folder / "kl_frontier.png", rep["kl_frontier"], rep["mean_rm_sft"], title)


def render_markdown(rep: dict, samples: list[dict], cfg) -> str:
    """report.md: the tables, the targets (met or not, said plainly), figures, samples."""
    lines = _md_winrates(rep) + _md_reward_model(rep) + _md_perplexity_targets(rep)
    if rep.get("kl_frontier"):
        lines += frontier.markdown(rep["kl_frontier"], rep["mean_rm_sft"])
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
        "| policy | held-out labeler (TextBlob) | training labeler (VADER) | KL from SFT | "
        "RM score |",
        "|---|---|---|---|---|",
        f"| SFT | 0.500 | 0.500 | 0.000 | {rep['mean_rm_sft']:+.3f} |",
    ]
    for k in TUNED:
        lines.append(
            f"| {POLICIES[k]} | {_f3(rep[f'winrate_{k}_vs_sft_heldout'])} | "
            f"{_f3(rep[f'winrate_{k}_vs_sft_train'])} | {_f3(rep[f'kl_{k}_from_sft'])} | "
            f"{rep[f'mean_rm_{k}']:+.3f} |"
        )
    lines += [
        "",
        "DPO trains on the reward model's training comparisons directly (no RM, no sampling), "
        "from SFT with SFT as its reference; the RM score column is the same RM's judgement of "
        "each policy's samples.",
    ]
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
    header = " | ".join(POLICIES.values())
    lines += ["", "## Samples (held-out prompts)", "", f"| prompt | {header} |"]
    lines.append("|---" * (len(POLICIES) + 1) + "|")
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
