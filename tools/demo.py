"""InstructGPT in miniature: SFT -> reward model -> PPO, PPO-ptx (and DPO on the same comparisons)
on Shakespeare, judged by simulated labelers (VADER trains, TextBlob is held out), with a report.

    python tools/demo.py                      # the full run (about 15 minutes on 2 CPU cores)
    python tools/demo.py --quick              # a smaller run (under 5 minutes), as CI runs it
    python tools/demo.py --output-dir runs/x  # default runs/demo (runs/demo_quick with --quick)
    python tools/demo.py --seed 1             # another seed (default folder runs/demo_seed1)
    python tools/demo.py --kl-sweep           # also PPO at 6 KL coefficients: the KL frontier
    python tools/demo.py --kl-sweep 0.02,0.1  # ... at the coefficients given

Running the same command again continues after the last finished stage. The report is
<output-dir>/report.md (numbers also in report.json, figures in figures/). See docs/demo.md.

Every training stage runs the tool a user would run (`tools/train_sft.py`, `train_rm.py`,
`train_ppo.py`, `train_dpo.py`, `generate.py`, `train_tokenizer.py`) as a subprocess, with the
YAML files in `configs/demo/` and dotted overrides for the run's paths, sizes and seeds; the data
work (`megarlhf.demo.data`) and the evaluation (`megarlhf.demo.report`) run in this process. Each
finished stage leaves `<output>/.done/<stage>`, and the evaluation runs again whenever a stage
before it ran, so `--kl-sweep` on a finished folder runs only the sweep and the evaluation.

The CPU code paths the numbers depend on (ATen's ISA, MKL's branch, the thread count) are pinned
before torch loads (`megarlhf.demo.repro`) and the tools inherit them: see the README on what is
bitwise reproducible.

Layout of `<output>`:
    data/         corpus parts, SFT demonstrations, prompts, comparisons, tokenizer
    pretrain/ sft/ rm/ ppo/ ppo_ptx/ dpo/   the tools' run directories (metrics.jsonl, checkpoints/)
    kl_sweep/beta_<b>/ kl_sweep.json   the sweep's PPO runs (the main PPO run stands for its own b)
    report.md report.json figures/*.png samples.jsonl   the evaluation
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from megarlhf.demo import repro  # noqa: E402

repro.pin()  # before anything imports torch
import yaml  # noqa: E402

from megarlhf.checkpoint.model_shards import resolve_checkpoint_dir  # noqa: E402
from megarlhf.demo import data as demo_data  # noqa: E402
from megarlhf.demo.data import KL_SWEEP_BETAS, STAGES, DemoConfig, DemoError  # noqa: E402


class StageFailed(RuntimeError):
    """A tool run by the demo exited non-zero (the message has its command line)."""


class Demo:
    """One demo run in `output`; `run()` executes the stages not yet done."""

    def __init__(
        self, cfg: DemoConfig, output: str | Path, quiet: bool = False, kl_sweep: tuple = ()
    ):
        self.cfg, self.out = cfg, Path(output).resolve()
        self.data = self.out / "data"
        self.tokenizer = self.data / "tokenizer"
        self.quiet = quiet
        self.kl_sweep = tuple(float(b) for b in kl_sweep)
        self.timings: dict[str, float] = {}

    def run(self) -> dict:
        demo_data.claim_output(self.out, self.cfg)
        done = self.out / ".done"
        done.mkdir(exist_ok=True)
        timing_file = self.out / "timings.json"
        if timing_file.exists():
            self.timings = json.loads(timing_file.read_text())
        ran = False
        for stage in STAGES:
            if stage == "kl_sweep" and not self.kl_sweep:
                continue
            if self._done(stage) and not (stage == "evaluate" and ran):
                self._say(f"== {stage}: done before, skipped")
                continue
            self._say(f"== {stage}")
            t0 = time.perf_counter()
            getattr(self, f"stage_{stage}")()
            self.timings[stage] = round(time.perf_counter() - t0, 1)
            timing_file.write_text(json.dumps(self.timings, indent=1) + "\n")
            (done / stage).touch()
            self._say(f"== {stage}: {self.timings[stage]:.0f} s")
            ran = True
        return json.loads((self.out / "report.json").read_text())

    def _done(self, stage: str) -> bool:
        """Whether `stage` finished before (for the sweep: every coefficient asked for ran)."""
        if stage != "kl_sweep":
            return (self.out / ".done" / stage).exists()
        index = self.out / "kl_sweep.json"
        runs = json.loads(index.read_text()) if index.exists() else {}
        return all(repr(b) in runs for b in self.kl_sweep)

    def _say(self, msg: str) -> None:
        if not self.quiet:
            print(msg, flush=True)

    def _tool(self, name: str, *args) -> None:
        """Run tools/<name> with this interpreter; its output goes to ours."""
        cmd = [sys.executable, str(ROOT / "tools" / name), *map(str, args)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
        kw = {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE} if self.quiet else {}
        res = subprocess.run(cmd, cwd=ROOT, env=env, text=True, **kw)
        if res.returncode != 0:
            tail = (res.stderr or "")[-4000:] if self.quiet else ""
            raise StageFailed(f"demo stage failed (exit {res.returncode}): {' '.join(cmd)}\n{tail}")

    def _train(self, tool: str, config: str, run: str, *overrides: str, init: str = "") -> None:
        path = ROOT / "configs" / "demo" / config
        args = ["--config", path, "--output-dir", self.out / run]
        if init:
            args += ["--init-from", self._checkpoint(init)]
        seeds = demo_data.seed_overrides(path, self.cfg.seed)
        self._tool(tool, *args, f"data.tokenizer={self.tokenizer}", *seeds, *overrides)

    def _checkpoint(self, run: str) -> Path:
        """The latest complete checkpoint of a run folder (what --init-from wants)."""
        return resolve_checkpoint_dir(self.out / run)

    # ----------------------------------------------------------------------------- stages

    def stage_data(self) -> None:
        """Corpus parts, SFT demonstrations, prompt sets, then the tokenizer, which fills the demo
        model's vocabulary exactly (configs/demo/model.yaml)."""
        demo_data.build_data(self.cfg, self.data)
        model_yaml = yaml.safe_load((ROOT / "configs" / "demo" / "model.yaml").read_text())
        self._tool(
            "train_tokenizer.py", "--input", self.data / "pretrain.txt", "--vocab-size",
            model_yaml["model"]["vocab_size"], "--output", self.tokenizer,
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
        """K SFT samples per prompt through tools/generate.py, grouped per prompt."""
        c = self.cfg
        prompts = [r["prompt"] for r in demo_data.read_jsonl(self.data / prompts_file)]
        rep = self.data / f"{out_name}_repeated.jsonl"
        demo_data.write_jsonl(rep, [{"prompt": p} for p in prompts for _ in range(c.k)])
        raw = self.data / f"{out_name}_samples.jsonl"
        self._tool(
            "generate.py", "--checkpoint", self.out / "sft", "--tokenizer", self.tokenizer,
            "--prompts-file", rep, "--template", "raw", "--batch-size", 128, "--output", raw,
            "generation.temperature=1.0", f"generation.max_new_tokens={c.max_new_tokens}",
            f"generation.seed={c.seed + len(out_name)}",
        )  # fmt: skip
        return demo_data.response_groups(prompts, demo_data.read_jsonl(raw), c.k)

    def stage_comparisons(self) -> None:
        """K SFT samples per prompt, ranked by the noisy training labeler (calibrated sigma)."""
        train = self._sample_groups("rm_prompts.jsonl", "rm_train")
        evals = self._sample_groups("rm_eval_prompts.jsonl", "rm_eval")
        info = demo_data.rank_comparisons(self.cfg, train, evals, self.data)
        sigma, agree = info["sigma"], info["agreement"]
        self._say(f"training labeler: VADER + N(0, {sigma:.3f}^2), agreement {agree:.3f}")

    def stage_rm(self) -> None:
        d = self.data
        self._train(
            "train_rm.py", "rm.yaml", "rm",
            f"data.train_files=[{d / 'rm_train.jsonl'}]", f"rm.eval_files=[{d / 'rm_eval.jsonl'}]",
            f"rm.normalize_files=[{d / 'sft.jsonl'}]", f"rm.epochs={self.cfg.rm_epochs}",
            init="sft",
        )  # fmt: skip

    def _ppo(self, run: str, ptx_coef: float, *overrides: str) -> None:
        d, c = self.data, self.cfg
        self._train(
            "train_ppo.py", "ppo.yaml", run,
            f"data.prompt_files=[{d / 'ppo_prompts.jsonl'}]", f"data.ptx_files=[{d / 'ptx.txt'}]",
            f"ppo.reward_model={self._checkpoint('rm')}", f"ppo.max_steps={c.ppo_steps}",
            f"ppo.ptx_coef={ptx_coef}", f"generation.max_new_tokens={c.max_new_tokens}",
            *overrides, init="sft",
        )  # fmt: skip

    def stage_ppo(self) -> None:
        self._ppo("ppo", 0.0)

    def stage_ppo_ptx(self) -> None:
        self._ppo("ppo_ptx", self.cfg.ptx_coef)

    def stage_dpo(self) -> None:
        """DPO from SFT on the reward model's training comparisons (no RM, no sampling)."""
        d = self.data
        self._train(
            "train_dpo.py", "dpo.yaml", "dpo",
            f"data.train_files=[{d / 'rm_train.jsonl'}]", f"dpo.eval_files=[{d / 'rm_eval.jsonl'}]",
            f"dpo.epochs={self.cfg.dpo_epochs}", init="sft",
        )  # fmt: skip

    def stage_kl_sweep(self) -> None:
        """PPO from the same SFT and RM at each KL coefficient of the sweep; the main PPO run is
        the point at its own coefficient. Each finished run is kept, so an interrupted or widened
        sweep runs only what it lacks; kl_sweep.json maps each coefficient to its run folder."""
        index = self.out / "kl_sweep.json"
        runs = json.loads(index.read_text()) if index.exists() else {}
        main_beta = demo_data.main_kl_coef(ROOT / "configs" / "demo" / "ppo.yaml")
        runs[repr(main_beta)] = "ppo"  # always a point of the frontier, at no cost
        for beta in self.kl_sweep:
            key, run = repr(beta), f"kl_sweep/beta_{beta:g}"
            if beta == main_beta:
                runs[key] = "ppo"
            elif runs.get(key) != run:
                self._say(f"-- PPO at kl_coef={beta:g}")
                self._ppo(run, 0.0, f"ppo.kl_coef={beta!r}")
                runs[key] = run
            index.write_text(json.dumps(runs, indent=1) + "\n")

    def stage_evaluate(self) -> None:
        from megarlhf.demo.report import evaluate

        evaluate(self.out, self.cfg, self.timings)


def _betas(text: str) -> tuple[float, ...]:
    try:
        betas = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of numbers: {text!r}"
        ) from None
    if not betas or min(betas) < 0:
        raise argparse.ArgumentTypeError(f"KL coefficients must be >= 0: {text!r}")
    return betas


def main(argv=None) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model", choices=("tiny", "smollm2"), default="tiny")
    known, argv = pre.parse_known_args(argv)
    if known.model == "smollm2":  # the real-model recipe: its own tool, without the pinned paths
        from tools.demo_smollm2 import main_unpinned

        return main_unpinned(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--model", choices=("tiny", "smollm2"), default="tiny",
        help="tiny: the 2.2M model pre-trained here; smollm2: tools/demo_smollm2.py's recipe",
    )  # fmt: skip
    p.add_argument("--quick", action="store_true", help="the small preset (CI)")
    p.add_argument("--seed", type=int, default=0, help="seed of data splits, init and sampling")
    p.add_argument("--output-dir", default=None, help="run folder (default runs/demo[_quick])")
    p.add_argument("--quiet", action="store_true", help="hide the tools' output (errors shown)")
    p.add_argument(
        "--kl-sweep", nargs="?", type=_betas, const=KL_SWEEP_BETAS, default=(),
        metavar="B1,B2,...", help=f"PPO at these KL coefficients too (default {KL_SWEEP_BETAS})",
    )  # fmt: skip
    args = p.parse_args(argv)
    cfg = DemoConfig.quick() if args.quick else DemoConfig.full()
    cfg.seed = args.seed
    default = ("runs/demo_quick" if args.quick else "runs/demo") + (
        f"_seed{cfg.seed}" if cfg.seed else ""
    )
    out = args.output_dir or default
    try:
        report = Demo(cfg, out, quiet=args.quiet, kl_sweep=args.kl_sweep).run()
    except (DemoError, StageFailed) as e:
        print(f"demo.py: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, DemoError) else 1
    print(Path(out) / "report.md")
    keys = ("winrate_ppo_vs_sft_heldout", "winrate_ppo_ptx_vs_sft_heldout",
            "winrate_dpo_vs_sft_heldout", "rm_accuracy_heldout_train_labeler", "kl_ppo_from_sft",
            "ppl_sft", "ppl_ppo", "ppl_ppo_ptx", "ppl_dpo")  # fmt: skip
    for k in keys:
        print(f"{k}: {report[k]:.3f}")
    if report.get("kl_frontier"):
        best = max(report["kl_frontier"], key=lambda r: r["winrate_heldout"])
        print(
            f"best KL coefficient (held-out win rate): {best['beta']:g} "
            f"(win rate {best['winrate_heldout']:.3f} at KL {best['kl']:.2f} nats)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
