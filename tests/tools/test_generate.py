"""tools/generate.py: a plain process and a 2-rank torchrun at TP=2 produce the same tokens as the
in-process reference generation, from a checkpoint saved at TP=1; a model with more ids than its
tokenizer samples only the tokenizer's ids; a tokenizer with more ids than the model is refused."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megarlhf.checkpoint.model_shards import save_model_shard
from megarlhf.config import GenerationConfig
from megarlhf.data.tokenizer import load_tokenizer
from megarlhf.model.generation import generate, left_pad
from tests.model.common import reference_model, tiny_config

ROOT = Path(__file__).parents[2]
TOKENIZER = ROOT / "data" / "tokenizer"
PROMPTS = ["What is the capital of France?", "Name a color.", "Count to three."]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tok = load_tokenizer(TOKENIZER)
    cfg = tiny_config("llama", vocab_size=tok.vocab_size, max_seq_len=96)
    model = reference_model(cfg)
    ckpt = tmp_path_factory.mktemp("ckpt")
    save_model_shard(ckpt, model.state_dict(), cfg, tp=1, tp_rank=0, pp=1, pp_rank=0)
    return ckpt, model, tok


def _expected(model, tok, gen, vocab_limit=None):
    ids = [tok.tokenize_pair(p, None, "auto").ids for p in PROMPTS]
    pids, pmask = left_pad(ids, tok.pad_id)
    g = torch.Generator().manual_seed(gen.seed)
    out = generate(
        model, pids, pmask, gen, tok.eos_id, tok.pad_id, generator=g, vocab_limit=vocab_limit
    )
    return [out.responses[i, : int(out.response_mask[i].sum())].tolist() for i in range(3)]


def _run(cmd, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    out = tmp_path / "out.jsonl"
    proc = subprocess.run(
        cmd + ["--output", str(out)], env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in out.read_text().splitlines()]


@pytest.mark.parametrize("launcher", ["plain", "torchrun-tp2", "deepspeed-tp2"])
def test_generate_tool_matches_reference(checkpoint, tmp_path, launcher):
    ckpt, model, tok = checkpoint
    gen = GenerationConfig(max_new_tokens=12, temperature=0.8, top_k=20, seed=4)
    args = [
        str(ROOT / "tools" / "generate.py"),
        "--checkpoint", str(ckpt), "--tokenizer", str(TOKENIZER),
        *sum((["--prompt", p] for p in PROMPTS), []),
        "generation.max_new_tokens=12", "generation.temperature=0.8", "generation.top_k=20",
        "generation.seed=4",
    ]  # fmt: skip
    if launcher == "plain":
        cmd = [sys.executable] + args
    elif launcher == "torchrun-tp2":
        torchrun = str(Path(sys.executable).parent / "torchrun")
        cmd = [torchrun, "--nproc_per_node", "2", "--master_port", "29611"] + args + ["--tp", "2"]
    else:
        deepspeed = str(Path(sys.executable).parent / "deepspeed")
        cmd = [deepspeed, "--num_gpus", "2", "--master_port", "29612"] + args + ["--tp", "2"]
    rows = _run(cmd, tmp_path)
    assert [r["prompt"] for r in rows] == PROMPTS
    assert [r["tokens"] for r in rows] == _expected(model, tok, gen)
    assert all(len(r["logprobs"]) == len(r["tokens"]) for r in rows)


def test_bad_prompts_file_names_the_line(checkpoint, tmp_path):
    ckpt, _, _ = checkpoint
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"nope": 1}\n')
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "generate.py"), "--checkpoint", str(ckpt),
         "--tokenizer", str(TOKENIZER), "--prompts-file", str(bad)],
        capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )  # fmt: skip
    assert proc.returncode != 0 and f"{bad}:2: bad prompt line" in proc.stderr


def _tool_args(ckpt, *overrides):
    return [
        sys.executable, str(ROOT / "tools" / "generate.py"), "--checkpoint", str(ckpt),
        "--tokenizer", str(TOKENIZER), *sum((["--prompt", p] for p in PROMPTS), []), *overrides,
    ]  # fmt: skip


def test_model_vocab_larger_than_the_tokenizer(tmp_path):
    """A model with 4x the tokenizer's ids (random weights: most of the mass on ids the tokenizer
    lacks) used to draw one and crash in decode (IndexError: OUT_OF_RANGE)."""
    tok = load_tokenizer(TOKENIZER)
    cfg = tiny_config("llama", vocab_size=4 * tok.vocab_size, max_seq_len=96)
    model = reference_model(cfg)
    ckpt = tmp_path / "ckpt"
    save_model_shard(ckpt, model.state_dict(), cfg, tp=1, tp_rank=0, pp=1, pp_rank=0)
    gen = GenerationConfig(max_new_tokens=12, temperature=1.0, seed=4)
    rows = _run(_tool_args(ckpt, "generation.max_new_tokens=12", "generation.temperature=1.0",
                           "generation.seed=4"), tmp_path)  # fmt: skip
    tokens = [r["tokens"] for r in rows]
    assert max(max(t) for t in tokens) < tok.vocab_size
    assert tokens == _expected(model, tok, gen, vocab_limit=tok.vocab_size)


def test_tokenizer_larger_than_the_model_is_refused(tmp_path):
    tok = load_tokenizer(TOKENIZER)
    cfg = tiny_config("llama", vocab_size=tok.vocab_size // 2, max_seq_len=96)
    ckpt = tmp_path / "ckpt"
    save_model_shard(ckpt, reference_model(cfg).state_dict(), cfg, tp=1, tp_rank=0, pp=1,
                     pp_rank=0)  # fmt: skip
    proc = subprocess.run(_tool_args(ckpt), capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        f"generate.py: error: --tokenizer {TOKENIZER} has {tok.vocab_size} ids but the model in "
        f"{ckpt} only model.vocab_size = {cfg.vocab_size}: they do not belong together"
    ]
