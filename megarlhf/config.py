"""Configuration: nested dataclasses are the single source of truth; YAML and dotted overrides
load into them.

Every config class validates its own fields in `__post_init__` and names the offending key.
`load_config(cls, path, overrides)` reads YAML (with optional `include:` of other YAML files,
relative to the including file), applies `a.b.c=value` overrides, and rejects unknown keys.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names the key."""


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


@dataclass
class ModelConfig:
    """Shape and flavour of a GPT model (GPT-2 or LLaMA family)."""

    # "gpt2" (learned positions, LayerNorm, GELU, biases) or "llama" (RoPE, RMSNorm, SwiGLU).
    family: str = "gpt2"
    # Real vocabulary size (before padding for tensor parallelism).
    vocab_size: int = 512
    # Model width.
    hidden_size: int = 64
    # Number of transformer blocks.
    num_layers: int = 2
    # Attention (query) heads.
    num_heads: int = 4
    # Key/value heads (grouped-query attention); 0 means equal to num_heads.
    num_kv_heads: int = 0
    # MLP inner width; 0 means 4*hidden (gpt2) or the LLaMA 8/3*hidden rounded to 256.
    ffn_hidden_size: int = 0
    # Longest sequence (prompt + response) the model sees; sizes position tables and caches.
    max_seq_len: int = 256
    # Epsilon of LayerNorm / RMSNorm.
    norm_eps: float = 1e-5
    # RoPE base frequency (llama only).
    rope_base: float = 10000.0
    # Share the input embedding with the output layer.
    tie_embeddings: bool = True
    # Dropout on hidden states (residual branches and embeddings).
    hidden_dropout: float = 0.0
    # Dropout on attention probabilities.
    attention_dropout: float = 0.0
    # Std of the normal initializer (output projections are scaled by 1/sqrt(2*num_layers)).
    init_std: float = 0.02
    # The padded vocabulary is a multiple of this times the TP size (see model.vocab_padding).
    make_vocab_size_divisible_by: int = 128
    # Recompute each block's activations in backward instead of storing them.
    activation_recompute: bool = False
    # Parameter/activation dtype: "fp32" or "bf16".
    dtype: str = "fp32"
    # Use flash-attn when importable on CUDA (falls back to torch SDPA otherwise).
    use_flash_attn: bool = True
    # Output head: "lm" (vocab-parallel logits) or "scalar" (reward / value head, per token).
    head: str = "lm"
    # Outputs of the scalar head (several for multi-attribute rewards).
    num_head_outputs: int = 1

    def __post_init__(self) -> None:
        _check(self.family in ("gpt2", "llama"), "model.family", f"{self.family!r} not gpt2|llama")
        for k in ("vocab_size", "hidden_size", "num_layers", "num_heads", "max_seq_len"):
            _check(getattr(self, k) > 0, f"model.{k}", f"must be > 0, got {getattr(self, k)}")
        if self.num_kv_heads == 0:
            self.num_kv_heads = self.num_heads
        _check(
            self.hidden_size % self.num_heads == 0,
            "model.hidden_size",
            f"{self.hidden_size} is not divisible by model.num_heads={self.num_heads}",
        )
        _check(
            self.num_heads % self.num_kv_heads == 0,
            "model.num_kv_heads",
            f"model.num_heads={self.num_heads} is not a multiple of {self.num_kv_heads}",
        )
        if self.ffn_hidden_size == 0:
            if self.family == "gpt2":
                self.ffn_hidden_size = 4 * self.hidden_size
            else:
                self.ffn_hidden_size = 256 * ((8 * self.hidden_size // 3 + 255) // 256)
        _check(self.dtype in ("fp32", "bf16"), "model.dtype", f"{self.dtype!r} not fp32|bf16")
        _check(self.head in ("lm", "scalar"), "model.head", f"{self.head!r} not lm|scalar")
        _check(self.num_head_outputs >= 1, "model.num_head_outputs", "must be >= 1")
        for k in ("hidden_dropout", "attention_dropout"):
            _check(0.0 <= getattr(self, k) < 1.0, f"model.{k}", "must be in [0, 1)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def torch_dtype(self):
        import torch

        return torch.float32 if self.dtype == "fp32" else torch.bfloat16


@dataclass
class ParallelConfig:
    """Parallel layout of the training job (data-parallel size = world / (tp * pp))."""

    # Tensor-parallel size.
    tp: int = 1
    # Pipeline-parallel size.
    pp: int = 1

    def __post_init__(self) -> None:
        _check(self.tp >= 1, "parallel.tp", f"must be >= 1, got {self.tp}")
        _check(self.pp >= 1, "parallel.pp", f"must be >= 1, got {self.pp}")


@dataclass
class GenerationConfig:
    """Sampling settings. Log-probs are always those of the temperature-scaled distribution."""

    # Tokens to generate at most per prompt.
    max_new_tokens: int = 32
    # Softmax temperature; 0 means greedy.
    temperature: float = 1.0
    # Keep only the k most likely tokens (0: off).
    top_k: int = 0
    # Keep the smallest set of tokens with cumulative probability >= top_p (1.0: off).
    top_p: float = 1.0
    # Seed of the sampling generator (same on every TP rank so they agree).
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.max_new_tokens >= 1, "generation.max_new_tokens", "must be >= 1")
        _check(self.temperature >= 0.0, "generation.temperature", "must be >= 0")
        _check(self.top_k >= 0, "generation.top_k", "must be >= 0")
        _check(0.0 < self.top_p <= 1.0, "generation.top_p", "must be in (0, 1]")


@dataclass
class ModelFileConfig:
    """A config file that only describes a model (the presets in configs/models/)."""

    model: ModelConfig = field(default_factory=ModelConfig)


# ----------------------------------------------------------------------------- loading


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: include cycle")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    includes = data.pop("include", [])
    merged: dict = {}
    for inc in [includes] if isinstance(includes, str) else includes:
        _deep_update(merged, _read_yaml(path.parent / inc, seen + (path,)))
    _deep_update(merged, data)
    return merged


def _deep_update(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (inner, *_) = typing.get_args(tp) or (Any,)
        return origin(_coerce(v, inner, key) for v in value)
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            out = tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != out:
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return out
    if tp is str:
        return str(value)
    return value


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys (named with their path)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key(s): {', '.join(prefix + k for k in unknown)} "
            f"(valid keys under {prefix.rstrip('.') or 'top level'}: {', '.join(sorted(names))})"
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except TypeError as e:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from None


def to_dict(cfg: Any) -> dict:
    """Plain nested dict of a config dataclass (for saving beside checkpoints)."""
    return dataclasses.asdict(cfg)


def parse_overrides(overrides: list[str]) -> dict:
    """Turn ["a.b=1", "c=x"] into a nested dict; values are parsed as YAML scalars."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        key, raw = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override")
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
    return out


def load_config(
    cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None
) -> T:
    """Load `cls` from a YAML file (optional) plus dotted overrides, validating everything."""
    data = _read_yaml(Path(path)) if path else {}
    _deep_update(data, parse_overrides(overrides or []))
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        where = f"{path}: " if path else ""
        raise ConfigError(f"{where}{e}") from None


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
