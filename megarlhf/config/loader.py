"""Loading configs: YAML files and dotted overrides into the dataclasses, and the one validation
helper every config class uses.

`load_config(cls, path, overrides)` reads YAML (with optional `include:` of other YAML files,
relative to the including file), applies `a.b.c=value` overrides, builds `cls` and rejects unknown
keys. Validation lives in each class's `__post_init__`, through `check(cond, key, msg)` with `key`
relative to that class (`"lr"`, not `"optim.lr"`); the loader prefixes the section path, so the
message names the full key (`optim.lr: must be > 0`). Cross-section checks in a run config give
full keys.

Inline sections. A field declared with `inline(SomeConfig)` is a typed sub-section whose keys sit
directly in the parent's mapping: `PPOConfig.algo` is a `PPOAlgoConfig`, and YAML still says
`ppo.kl_coef`, not `ppo.algo.kl_coef`. `to_dict` writes inline sections back flat, so a saved
config loads again. Several classes share one inline section (the loop section of SFT, RM and PPO)
without changing any key.

Defaults of nested sections: a section given in YAML starts from the field's own default (e.g. a
PPO `optim:` block keeps PPO's lr=1e-5 when it does not set lr), not from the class's defaults.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

_INLINE = "megarlhf_inline"


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names the key.

    Errors raised by `check` carry `key` (relative to the class that raised it) and `reason`, so
    the loader can say where in the file the key is.
    """

    def __init__(self, message: str, key: str | None = None, reason: str | None = None):
        super().__init__(message)
        self.key, self.reason = key, reason

    def under(self, prefix: str) -> ConfigError:
        """The same error with its key under section `prefix` (e.g. "optim.")."""
        if self.key is None or not prefix:
            return self
        return ConfigError(f"{prefix}{self.key}: {self.reason}", prefix + self.key, self.reason)


def check(cond: bool, key: str, msg: str) -> None:
    """Raise `ConfigError("key: msg")` unless `cond` (key relative to the checking class)."""
    if not cond:
        raise ConfigError(f"{key}: {msg}", key, msg)


def check_choice(value: str, choices, key: str) -> None:
    """`value` must be one of `choices` (a registry's names)."""
    check(value in choices, key, f"{value!r} is not one of {'|'.join(choices)}")


def inline(cls: type, **defaults):
    """A dataclass field holding section `cls` whose keys live in the parent's mapping."""
    return field(default_factory=lambda: cls(**defaults), metadata={_INLINE: True})


def _fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


def _is_inline(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get(_INLINE))


def config_keys(cls) -> list[str]:
    """The keys of `cls`'s mapping in YAML (inline sections' keys included, flat)."""
    hints = typing.get_type_hints(cls)
    keys = []
    for f in _fields(cls):
        keys += config_keys(hints[f.name]) if _is_inline(f) else [f.name]
    return keys


# ----------------------------------------------------------------------------- YAML


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


def _deep_update(dst: dict, src: dict, path: str = "") -> None:
    """Merge `src` into `dst`; a section that one side gives as a mapping and the other as a
    scalar is an error (an override must not silently replace a malformed section)."""
    for k, v in src.items():
        old = dst.get(k)
        if isinstance(v, dict) and isinstance(old, dict):
            _deep_update(old, v, f"{path}{k}.")
        elif isinstance(v, dict) and k in dst and old is not None:
            raise ConfigError(f"{path}{k}: expected a mapping (a config section), got {old!r}")
        else:
            dst[k] = v


# ----------------------------------------------------------------------------- building


def _coerce(value: Any, tp: Any, key: str, default: Any = None) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=key + ".", base=default)
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


def _field_default(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def _default_overrides(cls, base) -> dict:
    """Fields where a field's default instance `base` differs from `cls()`'s defaults (the
    arguments its default factory passed)."""
    if base is None:
        return {}
    try:
        plain = cls()
    except TypeError:  # required fields: nothing to diff against
        return {}
    return {
        f.name: copy.deepcopy(getattr(base, f.name))
        for f in _fields(cls)
        if getattr(base, f.name) != getattr(plain, f.name)
    }


def from_dict(cls: type[T], data: dict, prefix: str = "", base: Any = None) -> T:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys (named with their path).

    Args:
        data: the section's mapping (inline sections' keys included, flat).
        prefix: the section's path with a trailing dot ("ppo."), for messages.
        base: the default instance of this section where its parent declares one (its values
            are the defaults of the keys `data` does not give).
    """
    hints = typing.get_type_hints(cls)
    names = config_keys(cls)
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(
            f"unknown config key(s): {', '.join(prefix + k for k in unknown)} "
            f"(valid keys under {prefix.rstrip('.') or 'top level'}: {', '.join(sorted(names))})"
        )
    kwargs = _default_overrides(cls, base)
    for f in _fields(cls):
        default = getattr(base, f.name) if base is not None else _field_default(f)
        if _is_inline(f):
            own = {k: data[k] for k in config_keys(hints[f.name]) if k in data}
            kwargs[f.name] = from_dict(hints[f.name], own, prefix, base=default)
        elif f.name in data:
            kwargs[f.name] = _coerce(data[f.name], hints[f.name], prefix + f.name, default)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise e.under(prefix) from None
    except TypeError as e:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from None


def to_dict(cfg: Any) -> dict:
    """Plain nested dict of a config dataclass, inline sections flat (what YAML holds)."""
    out: dict = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            d = to_dict(v)
            if _is_inline(f):
                out.update(d)
            else:
                out[f.name] = d
        else:
            out[f.name] = copy.deepcopy(v)
    return out


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
