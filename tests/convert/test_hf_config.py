"""HF config.json <-> ModelConfig: every field mapped, both ways, and read back by transformers."""

import pytest

from megarlhf.convert import ConversionError, hf_config_to_model_config, model_config_to_hf_config


def test_gpt2_fields():
    hf = {
        "model_type": "gpt2",
        "vocab_size": 300,
        "n_embd": 32,
        "n_layer": 3,
        "n_head": 4,
        "n_inner": None,
        "n_positions": 64,
        "layer_norm_epsilon": 1e-5,
        "activation_function": "gelu_new",
        "resid_pdrop": 0.1,
        "dtype": "float32",
    }
    cfg = hf_config_to_model_config(hf)
    assert (cfg.family, cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.num_heads) == (
        "gpt2",
        300,
        32,
        3,
        4,
    )
    assert (cfg.ffn_hidden_size, cfg.max_seq_len, cfg.tie_embeddings) == (128, 64, True)
    assert cfg.hidden_dropout == 0.0 and cfg.dtype == "fp32"


def test_llama_fields_and_overrides():
    hf = {
        "model_type": "llama",
        "vocab_size": 49152,
        "hidden_size": 576,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "intermediate_size": 1536,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
        "dtype": "bfloat16",
        "head_dim": 64,
    }
    cfg = hf_config_to_model_config(hf, max_seq_len=2048, make_vocab_size_divisible_by=64)
    assert (cfg.num_kv_heads, cfg.ffn_hidden_size, cfg.rope_base, cfg.norm_eps) == (
        3,
        1536,
        100000.0,
        1e-5,
    )
    assert (cfg.max_seq_len, cfg.make_vocab_size_divisible_by, cfg.dtype) == (2048, 64, "bf16")
    back = model_config_to_hf_config(cfg, base=hf)
    # The capped max_seq_len does not shrink the exported model's position limit.
    assert back["max_position_embeddings"] == 8192
    assert back["rope_parameters"] == hf["rope_parameters"] and back["head_dim"] == 64
    # Legacy top-level rope_theta is read too.
    legacy = {k: v for k, v in hf.items() if k != "rope_parameters"} | {"rope_theta": 500000.0}
    assert hf_config_to_model_config(legacy).rope_base == 500000.0


def test_mistral_sliding_window_caps_max_seq_len():
    hf = {
        "model_type": "mistral",
        "vocab_size": 100,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 96,
        "max_position_embeddings": 32768,
        "sliding_window": 4096,
    }
    cfg = hf_config_to_model_config(hf)
    assert cfg.family == "llama" and cfg.max_seq_len == 4096
    back = model_config_to_hf_config(cfg, base=hf)
    assert back["model_type"] == "mistral" and back["max_position_embeddings"] == 32768


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa_tied", "llama_untied"])
def test_round_trip_through_transformers(hf_models, name):
    """config.json -> ModelConfig -> config.json (with and without the original as base) is a
    config transformers reads back as the same architecture."""
    import json

    from transformers import AutoConfig

    original = json.loads((hf_models[name] / "config.json").read_text())
    cfg = hf_config_to_model_config(original)
    ref = AutoConfig.for_model(**original)
    for base in (original, None):
        back = AutoConfig.for_model(**model_config_to_hf_config(cfg, base=base))
        assert hf_config_to_model_config(back.to_dict()) == cfg
        for key in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "tie_word_embeddings",
            "max_position_embeddings",
        ):
            assert getattr(back, key) == getattr(ref, key), key


def test_missing_required_key():
    with pytest.raises(ConversionError, match="missing required key 'n_embd'"):
        hf_config_to_model_config({"model_type": "gpt2", "vocab_size": 10})
