"""Fixtures for conversion tests: tiny random-init transformers models built offline from configs
(saved once per session), language models and reward models (`*ForSequenceClassification`,
num_labels=1), and their megarlhf checkpoints at every TP x PP layout. The SmolLM2 HF folder
(`smollm2_hf`) is a session fixture of tests/conftest.py."""

from __future__ import annotations

import pytest
import torch

from megarlhf.convert import hf_to_megarlhf

# Every layout the tests convert to; PP=2 splits the 3 layers 2 | 1.
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
# vocab 300 is not a multiple of 128 * tp: padded to 384 at TP=1 and 512 at TP=2.
VOCAB = 300


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=3,
        n_head=4,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
        initializer_range=0.3,  # peaked logits: greedy decoding gets varied, well-separated tokens
    )
    return GPT2LMHeadModel(cfg)


def _llama(tied: bool, kv_heads: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=48,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=kv_heads,
        intermediate_size=80,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_theta": 5000.0, "rope_type": "default"},
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.3,
    )
    return LlamaForCausalLM(cfg)


# name -> builder. llama_gqa_tied: 6 q / 2 kv heads (even over TP=2); llama_untied: 6 q / 3 kv
# heads, split unevenly over TP=2 as 4q+2kv | 2q+1kv.
MODELS = {
    "gpt2": _gpt2,
    "llama_gqa_tied": lambda: _llama(tied=True, kv_heads=2),
    "llama_untied": lambda: _llama(tied=False, kv_heads=3),
}


# Padding id of the reward models; test batches draw real tokens from [RM_FIRST_TOKEN, VOCAB).
RM_PAD, RM_FIRST_TOKEN = 0, 3


def _gpt2_rm():
    from transformers import GPT2Config, GPT2ForSequenceClassification

    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=3,
        n_head=4,
        n_positions=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=RM_PAD,
        num_labels=1,
        initializer_range=0.3,
    )
    return GPT2ForSequenceClassification(cfg)


def _llama_rm(model_type: str):
    from transformers import (
        LlamaConfig,
        LlamaForSequenceClassification,
        MistralConfig,
        MistralForSequenceClassification,
    )

    config_cls, model_cls = {
        "llama": (LlamaConfig, LlamaForSequenceClassification),
        "mistral": (MistralConfig, MistralForSequenceClassification),
    }[model_type]
    extra = {"sliding_window": 32} if model_type == "mistral" else {}
    cfg = config_cls(
        vocab_size=VOCAB,
        hidden_size=48,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        intermediate_size=80,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_theta": 5000.0, "rope_type": "default"},
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=RM_PAD,
        num_labels=1,
        initializer_range=0.3,
        **extra,
    )
    return model_cls(cfg)


# Reward models, one per family (mistral: a sliding window of 32 caps max_seq_len at 32).
REWARD_MODELS = {
    "gpt2_rm": _gpt2_rm,
    "llama_rm": lambda: _llama_rm("llama"),
    "mistral_rm": lambda: _llama_rm("mistral"),
}
# Layouts the reward models are converted to (a 2-rank spawn runs TP=2 and PP=2).
RM_LAYOUTS = [(1, 1), (2, 1), (1, 2)]


def _save_all(root, builders: dict, seed: int) -> dict:
    out = {}
    for i, (name, build) in enumerate(builders.items()):
        torch.manual_seed(seed + i)
        model = build().eval()
        model.save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="session")
def hf_rms(tmp_path_factory):
    """name -> HF folder of a random-init *ForSequenceClassification reward model."""
    return _save_all(tmp_path_factory.mktemp("hf_rm"), REWARD_MODELS, 200)


@pytest.fixture(scope="session")
def converted_rms(hf_rms, tmp_path_factory):
    """name -> {(tp, pp): megarlhf scalar-head checkpoint converted from the HF folder}."""
    root = tmp_path_factory.mktemp("ckpt_rm")
    out: dict = {}
    for name, hf in hf_rms.items():
        for tp, pp in RM_LAYOUTS:
            ckpt = root / f"{name}_tp{tp}pp{pp}"
            hf_to_megarlhf(hf, ckpt, tp=tp, pp=pp)
            out.setdefault(name, {})[(tp, pp)] = ckpt
    return out


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """name -> HF folder of a random-init transformers model (fixed seed)."""
    return _save_all(tmp_path_factory.mktemp("hf"), MODELS, 100)


@pytest.fixture(scope="session")
def converted(hf_models, tmp_path_factory):
    """name -> {(tp, pp): megarlhf checkpoint converted straight from the HF folder}."""
    root = tmp_path_factory.mktemp("ckpt")
    out: dict = {}
    for name, hf in hf_models.items():
        for tp, pp in LAYOUTS:
            ckpt = root / f"{name}_tp{tp}pp{pp}"
            hf_to_megarlhf(hf, ckpt, tp=tp, pp=pp)
            out.setdefault(name, {})[(tp, pp)] = ckpt
    return out
