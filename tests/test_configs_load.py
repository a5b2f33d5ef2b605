"""Every shipped config file loads into its run config, and every dotted override the README and
docs show is a valid key of some stage's config (keys are the user's interface: a refactor of the
dataclasses must keep all of them)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from megarlhf.config import ConfigError, ModelFileConfig, load_config
from megarlhf.config.dpo import DPORunConfig
from megarlhf.config.ppo import PPORunConfig
from megarlhf.config.rm import RMRunConfig
from megarlhf.config.sft import SFTRunConfig

ROOT = Path(__file__).resolve().parents[1]
RUN_CONFIGS = {"sft": SFTRunConfig, "rm": RMRunConfig, "ppo": PPORunConfig, "dpo": DPORunConfig}
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml"))
SECTIONS = (
    "model|parallel|data|optim|critic_optim|deepspeed|sft|rm|ppo|dpo|generation|checkpoint|logging"
)
# A value runs to a space, quote, pipe or closing bracket, except a list value in brackets
# (`model.lora.target_modules=[qkv,proj]`), which is taken whole.
OVERRIDE = re.compile(rf"(?<![\w./-])((?:{SECTIONS})\.[a-z_.]+=(?:\[[^\s\]]*\]|[^\s`'\"|)\]])+)")


def _kind(path: Path) -> type | None:
    """The run config a file is for: the stage section it sets, a model preset, or None for a
    fragment that stage configs include."""
    data = yaml.safe_load(path.read_text()) or {}
    stages = [k for k in RUN_CONFIGS if k in data]
    if len(stages) == 1:
        return RUN_CONFIGS[stages[0]]
    assert not stages, f"{path}: sets more than one stage section {stages}"
    return ModelFileConfig if set(data) <= {"model", "include"} else None


def _includers(path: Path) -> list[Path]:
    out = []
    for other in CONFIGS:
        inc = (yaml.safe_load(other.read_text()) or {}).get("include", [])
        for name in [inc] if isinstance(inc, str) else inc:
            if (other.parent / name).resolve() == path.resolve():
                out.append(other)
    return out


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT)) for p in CONFIGS])
def test_every_shipped_config_loads(path):
    kind = _kind(path)
    if kind is None:  # a fragment: it must be included by a config that loads (tested there)
        users = _includers(path)
        assert users and all(_kind(u) is not None for u in users), path
        return
    cfg = load_config(kind, path)
    assert cfg.model.vocab_size > 0


def _documented_overrides() -> list[tuple[str, str]]:
    out = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for m in OVERRIDE.finditer(doc.read_text()):
            item = m.group(1).rstrip(".,:;")
            placeholder = "<" in item or "..." in item or ".key=" in item
            if not placeholder:  # e.g. ppo.kl_coef=<x>, section.key=value
                out.append((doc.name, item))
    return sorted(set(out))


OVERRIDES = _documented_overrides()


def test_the_docs_show_overrides():
    assert len(OVERRIDES) > 40  # a broken pattern would make the next test vacuous


@pytest.mark.parametrize("doc,item", OVERRIDES, ids=[f"{d}:{i}" for d, i in OVERRIDES])
def test_documented_override_is_a_valid_key(doc, item):
    """Applied to the tiny config of each stage, it loads in at least one (values that only
    make sense with other overrides, e.g. a layout, may be refused for their value, never for
    their key)."""
    tiny = {"sft": "sft_tiny", "rm": "rm_tiny", "ppo": "ppo_tiny", "dpo": "dpo_tiny"}
    errors = []
    for stage, cls in RUN_CONFIGS.items():
        try:
            load_config(cls, ROOT / "configs" / f"{tiny[stage]}.yaml", [item])
            return
        except ConfigError as e:
            errors.append(str(e))
    unknown = [e for e in errors if "unknown config key" in e or "expected a mapping" in e]
    assert len(unknown) < len(errors), f"{doc}: {item}: {errors}"
