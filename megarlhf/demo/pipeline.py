"""The demo pipeline: data -> pre-training -> SFT -> comparisons -> RM -> PPO -> PPO-ptx -> report.

Every training stage runs the tool a user would run (`tools/train_sft.py`, `train_rm.py`,
`train_ppo.py`, `generate.py`, `train_tokenizer.py`) as a subprocess, with the YAML files in
`configs/demo/` and dotted overrides for the run's paths and sizes; the data stage and the
evaluation run in this process. Each finished stage leaves `<output>/.done/<stage>`, so running
the same command again continues after the last finished stage (the demo config must match).

Layout of `<output>`:
    data/         corpus parts, SFT demonstrations, prompts, comparisons, tokenizer
    pretrain/ sft/ rm/ ppo/ ppo_ptx/   the tools' run directories (metrics.jsonl, checkpoints/)
    report.md report.json figures/*.png samples.jsonl   the evaluation (megarlhf.demo.report)
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from megarlhf.demo import corpus
from megarlhf.eval import labelers

ROOT = Path(__file__).resolve().parents[2]
STAGES = ("data", "pretrain", "sft", "comparisons", "rm", "ppo", "ppo_ptx", "evaluate")


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
            eval_prompts=128,
        )


class Demo:
    """One demo run in `output`; `run()` executes the stages not yet done."""

    def __init__(self, cfg: DemoConfig, output: str | Path, quiet: bool = False):
        self.cfg, self.out = cfg, Path(output).resolve()
        self.data = self.out / "data"
        self.tokenizer = self.data / "tokenizer"
        self.quiet = quiet
        self.timings: dict[str, float] = {}

    # ----------------------------------------------------------------------------- driver

    def _check_config(self) -> None:
        path = self.out / "demo_config.json"
        mine = dataclasses.asdict(self.cfg)
        if path.exists():
            old = json.loads(path.read_text())
            if old != mine:
                diff = sorted(k for k in mine if old.get(k) != mine[k])
                raise SystemExit(
                    f"{path}: this output folder was made by a different demo config "
                    f"(differs in {', '.join(diff)}); use another --output-dir or delete it"
                )
        else:
            self.out.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(mine, indent=1) + "\n")

    def run(self) -> dict:
        self._check_config()
        done = self.out / ".done"
        done.mkdir(exist_ok=True)
        timing_file = self.out / "timings.json"
        if timing_file.exists():
            self.timings = json.loads(timing_file.read_text())
        for stage in STAGES:
            if (done / stage).exists():
                self._say(f"== {stage}: done before, skipped")
                continue
            self._say(f"== {stage}")
            t0 = time.perf_counter()
            getattr(self, f"stage_{stage}")()
            self.timings[stage] = round(time.perf_counter() - t0, 1)
            timing_file.write_text(json.dumps(self.timings, indent=1) + "\n")
            (done / stage).touch()
            self._say(f"== {stage}: {self.timings[stage]:.0f} s")
        return json.loads((self.out / "report.json").read_text())

    def _say(self, msg: str) -> None:
        if not self.quiet:
            print(msg, flush=True)

    def _tool(self, name: str, *args: str) -> None:
        """Run tools/<name> with this interpreter; its output goes to ours; failure stops the
        demo with the command line."""
        cmd = [sys.executable, str(ROOT / "tools" / name), *map(str, args)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
        kw = {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE} if self.quiet else {}
        res = subprocess.run(cmd, cwd=ROOT, env=env, text=True, **kw)
        if res.returncode != 0:
            tail = (res.stderr or "")[-4000:] if self.quiet else ""
            raise SystemExit(f"demo stage failed (exit {res.returncode}): {' '.join(cmd)}\n{tail}")

    def _train(self, tool: str, config: str, run: str, *overrides: str, init: str = "") -> None:
        args = ["--config", ROOT / "configs" / "demo" / config, "--output-dir", self.out / run]
        if init:
            args += ["--init-from", self._checkpoint(init)]
        self._tool(tool, *args, f"data.tokenizer={self.tokenizer}", *overrides)

    def _checkpoint(self, run: str) -> Path:
        """The latest complete checkpoint of a run folder (what --init-from wants)."""
        from megarlhf.checkpoint.model_shards import resolve_checkpoint_dir

        return resolve_checkpoint_dir(self.out / run)

    # ----------------------------------------------------------------------------- stages

    def stage_data(self) -> None:
        """Corpus parts, SFT demonstrations, prompt sets, the tokenizer."""
        c = self.cfg
        rng = np.random.default_rng(c.seed)
        split = corpus.split_corpus(corpus.sentences(), seed=c.seed)
        pretrain = [split.pretrain[i] for i in rng.permutation(len(split.pretrain))]
        if c.pretrain_clauses:
            pretrain = pretrain[: c.pretrain_clauses]
        pool = [corpus.prompt_split(s, c.seed) for s in split.train]
        pool = [pool[i] for i in rng.permutation(len(pool))]
        scores = labelers.vader_scores([cont for _, cont in pool])
        positive = [p for p, s in zip(pool, scores, strict=True) if s >= c.sft_min_score]
        if len(positive) < c.sft_demos:
            raise SystemExit(f"only {len(positive)} positive continuations for sft_demos")
        demos = positive[: c.sft_demos]
        used = set(demos)
        rest = [p for p in pool if p not in used]
        need = c.rm_prompts + c.ppo_prompts
        heldout = [corpus.prompt_split(s, c.seed) for s in split.heldout]
        heldout = [heldout[i] for i in rng.permutation(len(heldout))]
        if len(rest) < need or len(heldout) < c.rm_eval_prompts + c.eval_prompts:
            raise SystemExit("the corpus is too small for the requested prompt counts")
        d = self.data
        d.mkdir(parents=True, exist_ok=True)
        _write_lines(d / "pretrain.txt", pretrain)
        _write_jsonl(d / "pretrain.jsonl", [{"prompt": "", "response": s} for s in pretrain])
        _write_lines(d / "ptx.txt", split.ptx)
        _write_lines(d / "eval_text.txt", split.eval_text)
        _write_jsonl(d / "sft.jsonl", [{"prompt": p, "response": r} for p, r in demos])
        _write_jsonl(d / "rm_prompts.jsonl", [{"prompt": p} for p, _ in rest[: c.rm_prompts]])
        _write_jsonl(d / "ppo_prompts.jsonl", [{"prompt": p} for p, _ in rest[c.rm_prompts : need]])
        n = c.rm_eval_prompts
        _write_jsonl(d / "rm_eval_prompts.jsonl", [{"prompt": p} for p, _ in heldout[:n]])
        _write_jsonl(
            d / "eval_prompts.jsonl", [{"prompt": p} for p, _ in heldout[n : n + c.eval_prompts]]
        )
        sizes = {
            "clauses": len(split.pretrain) + len(split.ptx) + len(split.eval_text)
            + len(split.heldout),
            "pretrain": len(pretrain), "ptx": len(split.ptx), "eval_text": len(split.eval_text),
            "sft_demos": len(demos), "positive_pool": len(positive),
        }  # fmt: skip
        (d / "sizes.json").write_text(json.dumps(sizes, indent=1) + "\n")
        # The tokenizer fills the demo model's vocabulary exactly (configs/demo/model.yaml).
        model_yaml = yaml.safe_load((ROOT / "configs" / "demo" / "model.yaml").read_text())
        vocab = model_yaml["model"]["vocab_size"]
        self._tool(
            "train_tokenizer.py", "--input", d / "pretrain.txt", "--vocab-size", vocab,
            "--output", self.tokenizer,
        )  # fmt: skip

    def stage_pretrain(self) -> None:
        c = self.cfg
        self._train(
            "train_sft.py", "pretrain.yaml", "pretrain",
            f"data.train_files=[{self.data / 'pretrain.jsonl'}]", f"sft.epochs={c.pretrain_epochs}",
        )  # fmt: skip

    def stage_sft(self) -> None:
        self._train(
            "train_sft.py", "sft.yaml", "sft",
            f"data.train_files=[{self.data / 'sft.jsonl'}]", f"sft.epochs={self.cfg.sft_epochs}",
            init="pretrain",
        )  # fmt: skip

    def _sample_groups(self, prompts_file: str, out_name: str) -> list[dict]:
        """K SFT samples per prompt through tools/generate.py; returns per prompt the distinct
        non-empty responses (a prompt with fewer than two is counted and left out)."""
        c = self.cfg
        prompts = [json.loads(x)["prompt"] for x in (self.data / prompts_file).open()]
        rep = self.data / f"{out_name}_repeated.jsonl"
        _write_jsonl(rep, [{"prompt": p} for p in prompts for _ in range(c.k)])
        raw = self.data / f"{out_name}_samples.jsonl"
        self._tool(
            "generate.py", "--checkpoint", self.out / "sft", "--tokenizer", self.tokenizer,
            "--prompts-file", rep, "--template", "raw", "--batch-size", 128, "--output", raw,
            "generation.temperature=1.0", f"generation.max_new_tokens={c.max_new_tokens}",
            f"generation.seed={c.seed + len(out_name)}",
        )  # fmt: skip
        rows = [json.loads(x) for x in raw.open()]
        groups = []
        for i, p in enumerate(prompts):
            seen: dict[str, None] = {}
            for r in rows[i * c.k : (i + 1) * c.k]:
                if r["response"].strip():
                    seen.setdefault(r["response"], None)
            if len(seen) >= 2:
                groups.append({"prompt": p, "responses": list(seen)})
        return groups

    def stage_comparisons(self) -> None:
        """K SFT samples per prompt, ranked by the noisy training labeler (calibrated sigma)."""
        c = self.cfg
        rng = np.random.default_rng(c.seed + 11)
        train = self._sample_groups("rm_prompts.jsonl", "rm_train")
        evals = self._sample_groups("rm_eval_prompts.jsonl", "rm_eval")
        for g in train + evals:
            g["vader"] = labelers.vader_scores(g["responses"]).tolist()
            g["textblob"] = labelers.textblob_scores(g["responses"]).tolist()
        full = np.array([g["vader"] for g in train if len(g["vader"]) == c.k])
        sigma, agree = labelers.calibrate_noise(full, c.agreement, seed=c.seed)
        for g in train + evals:
            g["noisy_vader"] = labelers.noisy(np.array(g["vader"]), sigma, rng).tolist()
            g["ranking"] = labelers.ranking_of(np.array(g["noisy_vader"]))
        keep = ("prompt", "responses", "ranking")
        _write_jsonl(self.data / "rm_train.jsonl", [{k: g[k] for k in keep} for g in train])
        _write_jsonl(self.data / "rm_eval.jsonl", [{k: g[k] for k in keep} for g in evals])
        _write_jsonl(self.data / "comparisons_eval.jsonl", evals)
        info = {
            "sigma": sigma,
            "agreement": agree,
            "train_prompts": len(train),
            "eval_prompts": len(evals),
            "train_pairs": sum(len(g["responses"]) * (len(g["responses"]) - 1) // 2 for g in train),
            "dropped_train_prompts": c.rm_prompts - len(train),
            "dropped_eval_prompts": c.rm_eval_prompts - len(evals),
        }
        (self.data / "labeler.json").write_text(json.dumps(info, indent=1) + "\n")
        self._say(f"training labeler: VADER + N(0, {sigma:.3f}^2), agreement {agree:.3f}")

    def stage_rm(self) -> None:
        d = self.data
        self._train(
            "train_rm.py", "rm.yaml", "rm",
            f"data.train_files=[{d / 'rm_train.jsonl'}]", f"rm.eval_files=[{d / 'rm_eval.jsonl'}]",
            f"rm.normalize_files=[{d / 'sft.jsonl'}]", f"rm.epochs={self.cfg.rm_epochs}",
            init="sft",
        )  # fmt: skip

    def _ppo(self, run: str, ptx_coef: float) -> None:
        d, c = self.data, self.cfg
        self._train(
            "train_ppo.py", "ppo.yaml", run,
            f"data.prompt_files=[{d / 'ppo_prompts.jsonl'}]", f"data.ptx_files=[{d / 'ptx.txt'}]",
            f"ppo.reward_model={self._checkpoint('rm')}", f"ppo.max_steps={c.ppo_steps}",
            f"ppo.ptx_coef={ptx_coef}", f"generation.max_new_tokens={c.max_new_tokens}",
            init="sft",
        )  # fmt: skip

    def stage_ppo(self) -> None:
        self._ppo("ppo", 0.0)

    def stage_ppo_ptx(self) -> None:
        self._ppo("ppo_ptx", self.cfg.ptx_coef)

    def stage_evaluate(self) -> None:
        from megarlhf.demo.report import evaluate

        evaluate(self.out, self.cfg, self.timings)


def _write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(x + "\n" for x in lines))


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
