"""Config loading: presets, includes, dotted overrides, unknown keys and bad values named."""

from pathlib import Path

import pytest

from megarlhf.config import (
    ConfigError,
    GenerationConfig,
    ModelConfig,
    ModelFileConfig,
    from_dict,
    load_config,
    parse_overrides,
)
from megarlhf.model.gpt import sharding_plan

PRESETS = sorted((Path(__file__).parents[1] / "configs" / "models").glob("*.yaml"))


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_every_model_preset_loads_and_shards(path):
    cfg = load_config(ModelFileConfig, path).model
    assert cfg.hidden_size % cfg.num_heads == 0
    # Every preset can be laid out at TP=2 (uneven heads are allowed, kv heads >= tp).
    plan = sharding_plan(cfg, 2)
    assert plan["embedding.word.weight"].full_size % (2 * cfg.make_vocab_size_divisible_by) == 0


def test_llama_70b_preset_values():
    cfg = load_config(ModelFileConfig, Path("configs/models/llama_70b.yaml")).model
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == (8192, 80, 64, 8)
    assert cfg.ffn_hidden_size == 28672 and cfg.dtype == "bf16"


def test_overrides_and_include(tmp_path):
    (tmp_path / "base.yaml").write_text("model:\n  hidden_size: 32\n  num_heads: 2\n")
    (tmp_path / "run.yaml").write_text("include: base.yaml\nmodel:\n  num_layers: 3\n")
    cfg = load_config(ModelFileConfig, tmp_path / "run.yaml", ["model.num_heads=4"])
    assert (cfg.model.hidden_size, cfg.model.num_layers, cfg.model.num_heads) == (32, 3, 4)


def test_unknown_key_is_named(tmp_path):
    (tmp_path / "c.yaml").write_text("model:\n  hiden_size: 32\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown config key\(s\): model\.hiden_size"):
        load_config(ModelFileConfig, tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="unknown config key.*modle"):
        load_config(ModelFileConfig, None, ["modle.hidden_size=3"])


@pytest.mark.parametrize(
    "override,match",
    [
        ("model.num_heads=5", "model.hidden_size: 64 is not divisible by model.num_heads=5"),
        ("model.family=bert", "model.family"),
        ("model.num_layers=two", "model.num_layers: expected int"),
        ("model.num_kv_heads=3", "model.num_kv_heads"),
        ("model.dtype=fp16", "model.dtype"),
        ("model.hidden_dropout=1.5", "model.hidden_dropout"),
    ],
)
def test_bad_values_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(ModelFileConfig, None, [override])


def test_generation_validation_and_derived_fields():
    with pytest.raises(ConfigError, match="generation.top_p: must be in"):
        from_dict(GenerationConfig, {"top_p": 0.0}, prefix="generation.")
    cfg = ModelConfig(family="llama", hidden_size=96, num_heads=4)
    assert cfg.num_kv_heads == 4 and cfg.ffn_hidden_size == 256  # 8/3 * 96 = 256
    assert ModelConfig(family="gpt2", hidden_size=96, num_heads=4).ffn_hidden_size == 384


def test_parse_overrides_types():
    assert parse_overrides(["a.b=1", "a.c=0.5", "d=true", "e=x"]) == {
        "a": {"b": 1, "c": 0.5},
        "d": True,
        "e": "x",
    }
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_overrides(["novalue"])
