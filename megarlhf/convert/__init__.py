"""Hugging Face <-> megarlhf checkpoint conversion: config translation, per-family key-mapping
tables, streaming HF weight I/O, the scalar head's bias (reward models, critics:
`*ForSequenceClassification`), the three conversions (import, export, re-shard), and LoRA
adapters to a PEFT folder."""

from megarlhf.convert.convert import hf_to_megarlhf, megarlhf_to_hf, reshard, staged_output_dir
from megarlhf.convert.hf_config import (
    SUPPORTED_MODEL_TYPES,
    ConversionError,
    hf_config_to_model_config,
    model_config_to_hf_config,
)
from megarlhf.convert.peft_adapter import megarlhf_to_peft
from megarlhf.convert.score_head import SCORE_BIAS_KEY, SCORE_BIAS_POLICIES
from megarlhf.convert.tables import TABLES

__all__ = [
    "SCORE_BIAS_KEY",
    "SCORE_BIAS_POLICIES",
    "SUPPORTED_MODEL_TYPES",
    "TABLES",
    "ConversionError",
    "hf_config_to_model_config",
    "hf_to_megarlhf",
    "megarlhf_to_hf",
    "megarlhf_to_peft",
    "model_config_to_hf_config",
    "reshard",
    "staged_output_dir",
]
