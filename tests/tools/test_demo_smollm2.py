"""The real-model recipe's shortened variant end to end (tools/demo_smollm2.py --tiny, through
`tools/demo.py --model smollm2`): SmolLM2-135M-Instruct imported, SFT, comparisons, RM, PPO,
PPO-ptx, DPO, evaluation and export all run through the tools for a step or two each. Asserted:
the report has the main demo's keys and tables, and the export round trip holds against an
independent decoder: transformers loads the exported folder and, from prompts it formats with
its own tokenizer's chat template, decodes greedily the very tokens tools/generate.py decoded
from our checkpoint. The full run's numbers are in docs/demo.md ("The real-model recipe")."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
# The main demo's report keys (tests/tools/test_demo.py) and DPO's, RM scores, the fingerprint.
KEYS = (
    "winrate_ppo_vs_sft_heldout", "winrate_ppo_ptx_vs_sft_heldout", "winrate_ppo_vs_sft_train",
    "winrate_dpo_vs_sft_heldout", "rm_accuracy_heldout_train_labeler",
    "rm_accuracy_heldout_heldout_labeler", "ppl_sft", "ppl_ppo", "ppl_ppo_ptx", "ppl_dpo",
    "kl_ppo_from_sft", "kl_ppo_ptx_from_sft", "kl_dpo_from_sft", "mean_rm_sft", "mean_rm_ppo",
)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(smollm2_hf, tmp_path_factory):
    """The tiny run, from the session's imported HF folder (conftest `smollm2_hf`, shared with
    tests/convert/test_smollm2.py) rather than a second GGUF import."""
    out = tmp_path_factory.mktemp("demo_smollm2") / "run"
    cmd = [sys.executable, "tools/demo.py", "--model", "smollm2", "--tiny", "--quiet"]
    cmd += ["--base-hf", str(smollm2_hf), "--output-dir", str(out)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out, res.stdout


def test_report_has_the_main_demos_keys_and_tables(tiny_run):
    out, stdout = tiny_run
    rep = json.loads((out / "report.json").read_text())
    for k in KEYS:
        assert math.isfinite(rep[k]), k
    assert rep["model"] == "SmolLM2-135M-Instruct"
    assert set(rep["targets"]) >= {
        "winrate_ppo_vs_sft_heldout", "rm_accuracy_heldout_train_labeler",
        "ppl_ppo_ptx_closer_to_sft", "whole_run_s",
    }  # fmt: skip
    for stage in ("import", "sft", "rm", "ppo", "ppo_ptx", "dpo", "evaluate", "export"):
        assert rep["timings_s"][stage] > 0, stage
    assert rep["targets"]["whole_run_s"]["value"] == pytest.approx(sum(rep["timings_s"].values()))
    for f in ("winrates.png", "ppo_curves.png", "rm_accuracy.png"):
        assert (out / "figures" / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    for title in ("## Win rate against SFT", "## Reward model", "## Alignment tax", "## Targets",
                  "## Samples", "## Export round trip", "## Stage times"):  # fmt: skip
        assert title in md, title
    assert f"{rep['ppl_sft']:.2f}" in md
    # The win rates are those of the samples (a tie counts one half), as in the main demo.
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == rep["eval_prompts"] == 8
    for k, lab, suffix in (("ppo", "textblob", "heldout"), ("dpo", "vader", "train")):
        a, b = [r[f"{lab}_{k}"] for r in rows], [r[f"{lab}_sft"] for r in rows]
        wins = sum((x > y) + 0.5 * (x == y) for x, y in zip(a, b, strict=True)) / len(rows)
        assert rep[f"winrate_{k}_vs_sft_{suffix}"] == pytest.approx(wins, abs=1e-12)
    assert "winrate_ppo_vs_sft_heldout" in stdout


def test_export_round_trip_is_token_identical(tiny_run):
    """transformers on the exported folder, with prompts from its own tokenizer's template,
    against the tokens tools/generate.py wrote from our checkpoint (fp32: bf16 weights widened)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = tiny_run
    ex = out / "export"
    prompts = [json.loads(x)["prompt"] for x in (ex / "prompts.jsonl").read_text().splitlines()]
    ours = [json.loads(x)["tokens"] for x in (ex / "ours_fp32.jsonl").read_text().splitlines()]
    assert len(prompts) == len(ours) == 3
    tok = AutoTokenizer.from_pretrained(ex / "hf")
    model = AutoModelForCausalLM.from_pretrained(ex / "hf", dtype=torch.float32).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    for prompt, mine in zip(prompts, ours, strict=True):
        text = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            seq = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                eos_token_id=eos, pad_token_id=eos,
            )  # fmt: skip
        theirs = seq[0, ids.shape[1] :].tolist()
        theirs = theirs[: theirs.index(eos) + 1] if eos in theirs else theirs
        assert mine == theirs
    check = json.loads((ex / "check.json").read_text())
    assert check["transformers_loads"] and check["identical_fp32"]
    assert check["fp32"]["identical"] == check["prompts"] == 3


def test_an_unfinished_stage_starts_again_from_scratch(tmp_path, monkeypatch):
    """A training stage not marked done runs its tool on an empty folder: what an earlier attempt
    left (here a weights-only final checkpoint, which resuming would refuse) is removed first."""
    from megarlhf.demo.smollm2 import SmolLM2DemoConfig
    from tools import demo_smollm2

    monkeypatch.setattr(demo_smollm2, "resolve_checkpoint_dir", lambda run: run / "checkpoints")
    demo = demo_smollm2.SmolLM2Demo(SmolLM2DemoConfig.tiny(), tmp_path, quiet=True)
    left = tmp_path / "rm" / "checkpoints" / "step_000001"
    left.mkdir(parents=True)
    seen = []
    demo._tool = lambda name, *args: seen.append((name, (tmp_path / "rm").exists(), args))
    demo.stage_rm()
    ((name, existed, args),) = seen
    assert name == "train_rm.py" and not existed
    assert args[args.index("--output-dir") + 1] == tmp_path / "rm"
    assert args[args.index("--init-from") + 1] == tmp_path / "sft" / "checkpoints"
