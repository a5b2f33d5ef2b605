"""Configuration: nested dataclasses are the single source of truth; YAML and dotted overrides
load into them (`loader.py`).

One module per concern: `model` (model shape, parallel layout), `generation` (sampling), `optim`
(optimizer, DeepSpeed), `loop` (the training loop, checkpoints, logging), `data` (each stage's
data), and one per stage's run config (`sft`, `rm`, `ppo`). The common ones are re-exported here.
"""

from megarlhf.config.generation import GenerationConfig
from megarlhf.config.loader import (
    ConfigError,
    check,
    config_keys,
    from_dict,
    inline,
    load_config,
    parse_overrides,
    save_config,
    to_dict,
)
from megarlhf.config.model import ModelConfig, ModelFileConfig, ParallelConfig

__all__ = [
    "ConfigError",
    "GenerationConfig",
    "ModelConfig",
    "ModelFileConfig",
    "ParallelConfig",
    "check",
    "config_keys",
    "from_dict",
    "inline",
    "load_config",
    "parse_overrides",
    "save_config",
    "to_dict",
]
