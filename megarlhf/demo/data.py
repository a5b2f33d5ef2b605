"""The demo's configuration and its data work: corpus splits, SFT demonstrations, prompt sets and
the ranked comparisons the reward model trains on. Library functions only: the stage driver that
runs the training tools is `tools/demo.py`.

Layout of a demo's `<output>/data/`:
    pretrain.txt pretrain.jsonl ptx.txt eval_text.txt   corpus parts
    sft.jsonl                                          demonstrations (prompt, response)
    rm_prompts.jsonl ppo_prompts.jsonl rm_eval_prompts.jsonl eval_prompts.jsonl   prompt sets
    rm_train.jsonl rm_eval.jsonl comparisons_eval.jsonl labeler.json   ranked comparisons
    tokenizer/                                         trained on pretrain.txt
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from megarlhf.demo import corpus
from megarlhf.eval import labelers

# The stages in order; kl_sweep runs only when asked for (tools/demo.py --kl-sweep).
STAGES = (
    "data", "pretrain", "sft", "comparisons", "rm", "ppo", "ppo_ptx", "dpo", "kl_sweep",
    "evaluate",
)  # fmt: skip
# The KL coefficients of `--kl-sweep` without a list.
KL_SWEEP_BETAS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
# A seed s > 0 moves every seed in the stage configs by s * SEED_STRIDE (seed 0: the files' own).
SEED_STRIDE = 1000


class DemoError(ValueError):
    """A demo run cannot go on (a config clash, too little data); the message says why."""


@dataclass
class DemoConfig:
    """Sizes of one demo run (`full()` and `quick()` are the two presets)."""

    # Seed of every split, sample and labeler draw.
    seed: int = 0
    # Clauses of pre-training text (0: every clause not held out, about 32k).
    pretrain_clauses: int = 0
    pretrain_epochs: int = 2
    # SFT demonstrations: training-pool continuations with VADER compound >= sft_min_score.
    sft_demos: int = 3000
    sft_min_score: float = 0.5
    sft_epochs: int = 3
    # Comparisons: K SFT samples for each of rm_prompts training prompts (and rm_eval_prompts
    # held-out prompts), ranked by a noisy VADER calibrated to `agreement` inter-labeler agreement.
    k: int = 4
    agreement: float = 0.73
    rm_prompts: int = 2000
    rm_eval_prompts: int = 300
    rm_epochs: int = 3
    # PPO: prompts, steps, and the PTX coefficient of the PPO-ptx run.
    ppo_prompts: int = 2000
    ppo_steps: int = 60
    ptx_coef: float = 1.0
    # DPO on the RM's training comparisons: epochs over them.
    dpo_epochs: int = 2
    # Evaluation: held-out prompts (one sample per prompt and model) and samples shown.
    eval_prompts: int = 400
    max_new_tokens: int = 20
    shown_samples: int = 8

    @classmethod
    def full(cls) -> DemoConfig:
        return cls()

    @classmethod
    def quick(cls) -> DemoConfig:
        return cls(
            pretrain_clauses=8000,
            pretrain_epochs=2,
            sft_demos=800,
            sft_epochs=2,
            rm_prompts=400,
            rm_eval_prompts=100,
            rm_epochs=3,
            ppo_prompts=400,
            ppo_steps=15,
            dpo_epochs=1,
            eval_prompts=128,
        )


def claim_output(out: Path, cfg: DemoConfig) -> None:
    """Record `cfg` in `out/demo_config.json`, or refuse a folder made by another config."""
    path = out / "demo_config.json"
    mine = dataclasses.asdict(cfg)
    if path.exists():
        old = json.loads(path.read_text())
        if old != mine:
            diff = sorted(k for k in mine if old.get(k) != mine[k])
            raise DemoError(
                f"{path}: this output folder was made by a different demo config "
                f"(differs in {', '.join(diff)}); use another --output-dir or delete it"
            )
    else:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(mine, indent=1) + "\n")


def seed_overrides(config: Path, seed: int) -> list[str]:
    """Dotted overrides moving every `<section>.seed` of a stage config by seed * SEED_STRIDE
    (none for seed 0, so seed 0 is exactly the files' run)."""
    if seed == 0:
        return []
    doc = yaml.safe_load(Path(config).read_text()) or {}
    return [
        f"{name}.seed={section['seed'] + seed * SEED_STRIDE}"
        for name, section in doc.items()
        if isinstance(section, dict) and "seed" in section
    ]


def main_kl_coef(config: Path) -> float:
    """The KL coefficient of the main PPO run (configs/demo/ppo.yaml's ppo.kl_coef)."""
    return float(yaml.safe_load(Path(config).read_text())["ppo"]["kl_coef"])


def write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(x + "\n" for x in lines))


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def build_data(cfg: DemoConfig, d: Path) -> dict:
    """Corpus parts, SFT demonstrations and prompt sets into folder `d`; returns their sizes."""
    rng = np.random.default_rng(cfg.seed)
    split = corpus.split_corpus(corpus.sentences(), seed=cfg.seed)
    pretrain = [split.pretrain[i] for i in rng.permutation(len(split.pretrain))]
    if cfg.pretrain_clauses:
        pretrain = pretrain[: cfg.pretrain_clauses]
    pool = [corpus.prompt_split(s, cfg.seed) for s in split.train]
    pool = [pool[i] for i in rng.permutation(len(pool))]
    scores = labelers.vader_scores([cont for _, cont in pool])
    positive = [p for p, s in zip(pool, scores, strict=True) if s >= cfg.sft_min_score]
    if len(positive) < cfg.sft_demos:
        raise DemoError(f"only {len(positive)} positive continuations for sft_demos")
    demos = positive[: cfg.sft_demos]
    used = set(demos)
    rest = [p for p in pool if p not in used]
    need = cfg.rm_prompts + cfg.ppo_prompts
    heldout = [corpus.prompt_split(s, cfg.seed) for s in split.heldout]
    heldout = [heldout[i] for i in rng.permutation(len(heldout))]
    if len(rest) < need or len(heldout) < cfg.rm_eval_prompts + cfg.eval_prompts:
        raise DemoError("the corpus is too small for the requested prompt counts")
    d.mkdir(parents=True, exist_ok=True)
    write_lines(d / "pretrain.txt", pretrain)
    write_jsonl(d / "pretrain.jsonl", [{"prompt": "", "response": s} for s in pretrain])
    write_lines(d / "ptx.txt", split.ptx)
    write_lines(d / "eval_text.txt", split.eval_text)
    write_jsonl(d / "sft.jsonl", [{"prompt": p, "response": r} for p, r in demos])
    write_jsonl(d / "rm_prompts.jsonl", [{"prompt": p} for p, _ in rest[: cfg.rm_prompts]])
    write_jsonl(d / "ppo_prompts.jsonl", [{"prompt": p} for p, _ in rest[cfg.rm_prompts : need]])
    n = cfg.rm_eval_prompts
    write_jsonl(d / "rm_eval_prompts.jsonl", [{"prompt": p} for p, _ in heldout[:n]])
    write_jsonl(
        d / "eval_prompts.jsonl", [{"prompt": p} for p, _ in heldout[n : n + cfg.eval_prompts]]
    )
    sizes = {
        "clauses": len(split.pretrain) + len(split.ptx) + len(split.eval_text)
        + len(split.heldout),
        "pretrain": len(pretrain), "ptx": len(split.ptx), "eval_text": len(split.eval_text),
        "sft_demos": len(demos), "positive_pool": len(positive),
    }  # fmt: skip
    (d / "sizes.json").write_text(json.dumps(sizes, indent=1) + "\n")
    return sizes


def response_groups(prompts: list[str], rows: list[dict], k: int) -> list[dict]:
    """Per prompt the distinct non-empty responses of its k samples (`rows` holds k consecutive
    rows per prompt); a prompt with fewer than two is left out."""
    groups = []
    for i, p in enumerate(prompts):
        seen: dict[str, None] = {}
        for r in rows[i * k : (i + 1) * k]:
            if r["response"].strip():
                seen.setdefault(r["response"], None)
        if len(seen) >= 2:
            groups.append({"prompt": p, "responses": list(seen)})
    return groups


def rank_comparisons(cfg: DemoConfig, train: list[dict], evals: list[dict], d: Path) -> dict:
    """Label the response groups with both labelers, rank them by the noisy training labeler
    (its noise calibrated to cfg.agreement), write the RM files into `d`; returns labeler.json."""
    rng = np.random.default_rng(cfg.seed + 11)
    for g in train + evals:
        g["vader"] = labelers.vader_scores(g["responses"]).tolist()
        g["textblob"] = labelers.textblob_scores(g["responses"]).tolist()
    full = np.array([g["vader"] for g in train if len(g["vader"]) == cfg.k])
    sigma, agree = labelers.calibrate_noise(full, cfg.agreement, seed=cfg.seed)
    for g in train + evals:
        g["noisy_vader"] = labelers.noisy(np.array(g["vader"]), sigma, rng).tolist()
        g["ranking"] = labelers.ranking_of(np.array(g["noisy_vader"]))
    keep = ("prompt", "responses", "ranking")
    write_jsonl(d / "rm_train.jsonl", [{k: g[k] for k in keep} for g in train])
    write_jsonl(d / "rm_eval.jsonl", [{k: g[k] for k in keep} for g in evals])
    write_jsonl(d / "comparisons_eval.jsonl", evals)
    info = {
        "sigma": sigma,
        "agreement": agree,
        "train_prompts": len(train),
        "eval_prompts": len(evals),
        "train_pairs": sum(len(g["responses"]) * (len(g["responses"]) - 1) // 2 for g in train),
        "dropped_train_prompts": cfg.rm_prompts - len(train),
        "dropped_eval_prompts": cfg.rm_eval_prompts - len(evals),
    }
    (d / "labeler.json").write_text(json.dumps(info, indent=1) + "\n")
    return info
