"""Hugging Face `config.json` <-> `ModelConfig`, per family.

Each family is a table of (our field, HF key, default) plus the HF settings our model does not
implement, which are refused with the offending key rather than converted into a different model.

Simplifications, stated:
- Dropout is set to 0 on import (RLHF fine-tuning runs without it; set it in the training config).
- Mistral's sliding window is honoured by capping `max_seq_len` at the window: within it, sliding
  and full causal attention are the same computation.
- fp16 checkpoints are imported as fp32 (lossless); our model runs fp32 or bf16.

The head comes from `architectures`: `*ForSequenceClassification` (a reward model or critic) is
our scalar head with `num_head_outputs` = the number of labels (`id2label`); anything else is a
language model. Export writes the architecture of the model's head back (`GPT2LMHeadModel`,
`LlamaForCausalLM`, `MistralForSequenceClassification`, ...).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from megarlhf.checkpoint.model_shards import CheckpointError
from megarlhf.config import ConfigError, ModelConfig


class ConversionError(CheckpointError):
    """A checkpoint cannot be converted; the message names the key or file at fault."""


@dataclass(frozen=True)
class Field:
    """One ModelConfig field read from an HF config key (`default` when the key is absent/None)."""

    ours: str
    hf: str
    default: object = None


@dataclass(frozen=True)
class Requirement:
    """An HF setting our model implements only for the listed values (absent key = `default`)."""

    hf: str
    allowed: tuple
    default: object = None


@dataclass(frozen=True)
class ConfigTable:
    family: str
    model_types: tuple[str, ...]
    fields: tuple[Field, ...]
    requirements: tuple[Requirement, ...]


GPT2_CONFIG = ConfigTable(
    family="gpt2",
    model_types=("gpt2",),
    fields=(
        Field("vocab_size", "vocab_size"),
        Field("hidden_size", "n_embd"),
        Field("num_layers", "n_layer"),
        Field("num_heads", "n_head"),
        Field("ffn_hidden_size", "n_inner", 0),
        Field("max_seq_len", "n_positions"),
        Field("norm_eps", "layer_norm_epsilon", 1e-5),
        Field("tie_embeddings", "tie_word_embeddings", True),
    ),
    requirements=(
        Requirement("activation_function", ("gelu_new", "gelu_pytorch_tanh"), "gelu_new"),
        Requirement("scale_attn_weights", (True,), True),
        Requirement("scale_attn_by_inverse_layer_idx", (False,), False),
        Requirement("add_cross_attention", (False,), False),
    ),
)

LLAMA_CONFIG = ConfigTable(
    family="llama",
    model_types=("llama", "mistral"),
    fields=(
        Field("vocab_size", "vocab_size"),
        Field("hidden_size", "hidden_size"),
        Field("num_layers", "num_hidden_layers"),
        Field("num_heads", "num_attention_heads"),
        Field("num_kv_heads", "num_key_value_heads", 0),
        Field("ffn_hidden_size", "intermediate_size"),
        Field("max_seq_len", "max_position_embeddings"),
        Field("norm_eps", "rms_norm_eps", 1e-6),
        Field("tie_embeddings", "tie_word_embeddings", False),
    ),
    requirements=(
        Requirement("hidden_act", ("silu",), "silu"),
        Requirement("attention_bias", (False,), False),
        Requirement("mlp_bias", (False,), False),
        Requirement("rope_scaling", (None,), None),
    ),
)

CONFIG_TABLES = {t.family: t for t in (GPT2_CONFIG, LLAMA_CONFIG)}
_BY_MODEL_TYPE = {mt: t for t in CONFIG_TABLES.values() for mt in t.model_types}
SUPPORTED_MODEL_TYPES = tuple(sorted(_BY_MODEL_TYPE))
_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp32"}
# transformers class names: stem of each model_type + the suffix of the head.
_CLASS_STEM = {"gpt2": "GPT2", "llama": "Llama", "mistral": "Mistral"}
SEQUENCE_CLASSIFICATION = "ForSequenceClassification"


def architecture(model_type: str, head: str) -> str:
    """The transformers class of a `model_type` with our `head` ("lm" or "scalar")."""
    if head == "scalar":
        return _CLASS_STEM[model_type] + SEQUENCE_CLASSIFICATION
    return _CLASS_STEM[model_type] + ("LMHeadModel" if model_type == "gpt2" else "ForCausalLM")


def head_of(hf: dict) -> dict:
    """ModelConfig head fields of an HF config: scalar for `*ForSequenceClassification`."""
    if not any(a.endswith(SEQUENCE_CLASSIFICATION) for a in hf.get("architectures") or []):
        return {"head": "lm", "num_head_outputs": 1}
    # transformers' num_labels is len(id2label); a config without labels means its default, 2.
    labels = hf.get("id2label")
    n = len(labels) if labels else int(hf.get("num_labels", 2))
    return {"head": "scalar", "num_head_outputs": n}


def config_table_for(hf: dict) -> ConfigTable:
    model_type = hf.get("model_type")
    if model_type not in _BY_MODEL_TYPE:
        raise ConversionError(
            f"config.json: model_type {model_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    return _BY_MODEL_TYPE[model_type]


def _rope_theta(hf: dict) -> float:
    """RoPE base: transformers 5 nests it in `rope_parameters`, older configs keep `rope_theta`."""
    params = hf.get("rope_parameters") or {}
    if params.get("rope_type", "default") != "default":
        raise ConversionError(
            f"config.json: rope_parameters.rope_type={params['rope_type']!r} is not supported "
            "(only the default rotary embedding)"
        )
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def hf_config_to_model_config(hf: dict, **overrides) -> ModelConfig:
    """ModelConfig of the model an HF `config.json` describes.

    Args:
        hf: the parsed config.json.
        **overrides: ModelConfig fields to set on top (e.g. dtype, make_vocab_size_divisible_by).

    Raises:
        ConversionError: unsupported model_type or setting, naming the key.
    """
    table = config_table_for(hf)
    for req in table.requirements:
        value = hf.get(req.hf, req.default)
        if value not in req.allowed:
            raise ConversionError(
                f"config.json: {req.hf}={value!r} is not supported for {hf['model_type']} "
                f"(supported: {', '.join(map(repr, req.allowed))})"
            )
    kwargs: dict = {"family": table.family, "hidden_dropout": 0.0, "attention_dropout": 0.0}
    kwargs.update(head_of(hf))
    for f in table.fields:
        value = hf.get(f.hf)
        if value is None:
            if f.default is None:
                raise ConversionError(f"config.json: missing required key {f.hf!r}")
            value = f.default
        kwargs[f.ours] = value
    if table.family == "llama":
        kwargs["rope_base"] = _rope_theta(hf)
        head_dim = hf.get("head_dim")
        if head_dim is not None and head_dim * hf["num_attention_heads"] != hf["hidden_size"]:
            raise ConversionError(
                f"config.json: head_dim={head_dim} * num_attention_heads != hidden_size "
                f"({hf['hidden_size']}); only head_dim = hidden_size / heads is supported"
            )
        window = hf.get("sliding_window")
        if window is not None and hf.get("use_sliding_window", True):
            kwargs["max_seq_len"] = min(kwargs["max_seq_len"], int(window))
    dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    kwargs["dtype"] = _DTYPES.get(dtype, "fp32")
    kwargs.update(overrides)
    try:
        return ModelConfig(**kwargs)
    except ConfigError as e:
        raise ConversionError(f"config.json: {e}") from None


_DROP_ON_EXPORT = ("quantization_config", "_name_or_path", "transformers_version", "torch_dtype")


def model_config_to_hf_config(cfg: ModelConfig, base: dict | None = None) -> dict:
    """An HF `config.json` dict for `cfg`.

    Args:
        cfg: the model.
        base: the HF config the model was imported from, if any: its other keys (token ids,
            model_type mistral, ...) are kept and the architecture keys are overwritten from `cfg`.
    """
    table = CONFIG_TABLES[cfg.family]
    out = copy.deepcopy(base) if base else {}
    for key in _DROP_ON_EXPORT:
        out.pop(key, None)
    if out.get("model_type") not in table.model_types:
        out["model_type"] = table.model_types[0]
    out["architectures"] = [architecture(out["model_type"], cfg.head)]
    if cfg.head == "scalar":
        _set_labels(out, cfg.num_head_outputs)
    for f in table.fields:
        out[f.hf] = getattr(cfg, f.ours)
    for req in table.requirements:
        if out.get(req.hf, req.default) not in req.allowed:
            out[req.hf] = req.allowed[0]
    if cfg.family == "gpt2":
        out["resid_pdrop"] = out["embd_pdrop"] = cfg.hidden_dropout
        out["attn_pdrop"] = cfg.attention_dropout
    else:
        out["head_dim"] = cfg.head_dim
        out["attention_dropout"] = cfg.attention_dropout
        out.pop("rope_theta", None)
        out["rope_parameters"] = {"rope_theta": cfg.rope_base, "rope_type": "default"}
        if base and base.get("max_position_embeddings", 0) > cfg.max_seq_len:
            # Import capped max_seq_len at a sliding window; the model's own limit is unchanged.
            out["max_position_embeddings"] = base["max_position_embeddings"]
    out["dtype"] = {"fp32": "float32", "bf16": "bfloat16"}[cfg.dtype]
    return out


def _set_labels(out: dict, n: int) -> None:
    """transformers' label maps for `n` scalar outputs (the base's names kept when they fit)."""
    out.pop("num_labels", None)
    labels = out.get("id2label") or {}
    if len(labels) != n:
        out["id2label"] = {str(i): f"LABEL_{i}" for i in range(n)}
        out["label2id"] = {f"LABEL_{i}": i for i in range(n)}
