"""Reward models across the tools: an HF GPT-2 reward model converted by tools/convert_hf.py is
the reward model and the critic's initialization of a tools/train_ppo.py run, and a reward model
trained by tools/train_rm.py (normalized, so its head has a bias) exported by tools/convert_hf.py
scores in transformers as it does in megarlhf."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from megarlhf.checkpoint import atomic
from megarlhf.checkpoint.model_shards import ModelShardsReader
from megarlhf.convert import SCORE_BIAS_KEY
from tests.convert.test_reward_models import hf_scores, our_scores
from tests.trainers.common import QUIET, ROOT, env, metrics
from tools import convert_hf

# The tokenizer of the tiny configs: 512 ids, pad 0, eos 3.
PAD, EOS, VOCAB = 0, 3, 512


def _tool(name: str, config: str, out, overrides: list[str], timeout: float = 300):
    cmd = [sys.executable, str(ROOT / "tools" / name), "--config", str(ROOT / config)]
    cmd += ["--output-dir", str(out), *QUIET, *overrides]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, f"{name} exit {proc.returncode}\n{proc.stderr[-4000:]}"
    return proc


def _batch(side: str, lengths=(20, 7, 13, 2), seq=20, seed=3):
    """Token batches as the RM scores them: real tokens, EOS last, pad id 0 elsewhere."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (len(lengths), seq), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        span = slice(0, n) if side == "right" else slice(seq - n, seq)
        mask[i, span] = 1
        ids[i, span.stop - 1] = EOS
    return ids.masked_fill(mask == 0, PAD), mask


# ----------------------------------------------------------------------------- HF RM -> PPO


def _constant_score_rm(path) -> float:
    """An HF GPT-2 reward model of the tiny PPO config's shape whose final LayerNorm has weight 0,
    so every token scores score.weight . ln_f.bias, one known constant; returns it (computed by
    transformers)."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(5)
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=128,
        bos_token_id=2,
        eos_token_id=EOS,
        pad_token_id=PAD,
        num_labels=1,
    )
    model = GPT2ForSequenceClassification(cfg).eval()
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.normal_(0.0, 1.0)
    model.save_pretrained(path)
    ids, mask = _batch("right")
    with torch.no_grad():
        scores = model(ids, attention_mask=mask).logits[:, 0]
    assert torch.allclose(scores, scores[0]) and abs(scores[0].item()) > 0.1
    return scores[0].item()


def test_converted_hf_reward_model_scores_and_initializes_the_critic(tmp_path):
    constant = _constant_score_rm(tmp_path / "hf_rm")
    ckpt = tmp_path / "rm"
    assert convert_hf.main(["--hf-to-megarlhf", str(tmp_path / "hf_rm"), str(ckpt)]) == 0
    shape = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4"]
    shape += ["model.vocab_size=512", "model.max_seq_len=128"]
    fast = ["ppo.max_steps=2", "ppo.rollout_batch_size=8", "ppo.micro_batch_size=4"]
    fast += ["ppo.ptx_batch_size=4", "generation.max_new_tokens=8"]
    _tool("train_ppo.py", "configs/ppo_tiny.yaml", tmp_path / "ppo", [*shape, *fast] + [
        f"ppo.reward_model={ckpt}",
    ])  # fmt: skip
    recs = metrics(tmp_path / "ppo")
    assert [r["step"] for r in recs] == [1, 2]
    for r in recs:  # the frozen reward model is the converted one: every rollout scores `constant`
        assert r["reward_mean"] == pytest.approx(constant, rel=1e-5)
        assert r["reward_std"] < 1e-5 * abs(constant)
    # The first rollout's values come from the initial critic, the converted model: `constant`
    # at every token. The actor is still the reference there (KL 0), so every return is the
    # final score, `constant` too: the values explain the returns exactly. A critic off by even
    # 1e-6 would score about -1e0 (the returns' variance is floored at 1e-12), a random one far
    # below.
    assert recs[0]["explained_variance"] == pytest.approx(1.0, abs=1e-6)


# ----------------------------------------------------------------------------- train_rm -> HF


@pytest.fixture(scope="module")
def trained_rm(tmp_path_factory):
    """The final checkpoint of a 3-step tools/train_rm.py run (reward normalization included)."""
    out = tmp_path_factory.mktemp("rm_run")
    _tool("train_rm.py", "configs/rm_tiny.yaml", out, ["rm.max_steps=3"])
    ckpt = atomic.find_latest(out / "checkpoints")
    with ModelShardsReader(ckpt) as r:
        bias = r.full_tensor("head.bias")
    assert bias.abs().item() > 1e-4  # normalized: the case HF's bias-free score layer lacks
    return ckpt, bias.item()


def test_trained_rm_export_needs_a_bias_policy(trained_rm, tmp_path, capsys):
    ckpt, bias = trained_rm
    assert convert_hf.main(["--megarlhf-to-hf", str(ckpt), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"head.bias = [{bias:.6g}] is not zero" in err and "--score-bias" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("policy", ["fold", "drop"])
def test_trained_rm_scores_identically_in_transformers(trained_rm, policy, tmp_path):
    ckpt, bias = trained_rm
    out = tmp_path / "hf"
    argv = ["--megarlhf-to-hf", str(ckpt), str(out), "--score-bias", policy]
    assert convert_hf.main(argv + ["--pad-token-id", str(PAD)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["GPT2ForSequenceClassification"]
    assert config["pad_token_id"] == PAD
    shift = bias if policy == "drop" else 0.0
    assert config.get(SCORE_BIAS_KEY) == ([bias] if policy == "drop" else None)
    for side in ("right", "left"):
        ids, mask = _batch(side)
        ours, ref = our_scores(ckpt, ids, mask), hf_scores(out, ids, mask)
        assert ref.std() > 1e-3  # a trained, input-dependent reward
        torch.testing.assert_close(ours - shift, ref, rtol=1e-5, atol=1e-5 * ref.abs().max())
