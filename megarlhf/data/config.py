"""`DataConfig`: where SFT data comes from and how it becomes fixed-length training rows."""

from __future__ import annotations

from dataclasses import dataclass, field

from megarlhf.config import ConfigError
from megarlhf.data.tokenizer import TEMPLATES


@dataclass
class DataConfig:
    """SFT data: files, tokenizer, formatting, row length, packing, bad-input policy, seed."""

    # JSONL files of {"prompt", "response"} or {"messages": [{"role", "content"}, ...]} rows.
    train_files: list[str] = field(default_factory=lambda: ["data/sft_tiny.jsonl"])
    # Tokenizer: a sentencepiece .model file, a folder with tokenizer.model, or a HF folder.
    tokenizer: str = "data/tokenizer"
    # Formatting: "auto" (the tokenizer's own chat template, else the built-in one), "default"
    # (always the built-in one) or "raw" (prompt + response verbatim; prompt/response rows only).
    template: str = "auto"
    # Tokens per training row; a longer sample is invalid. At most model.max_seq_len.
    seq_len: int = 256
    # Pack several samples into each row (greedy first-fit); false: one padded sample per row.
    pack: bool = True
    # Skip invalid rows, logging a count per reason, instead of failing on the first one.
    skip_invalid: bool = False
    # Seed of the packing shuffle and of every epoch's row order.
    seed: int = 1234

    def __post_init__(self) -> None:
        if not self.train_files or not all(isinstance(f, str) and f for f in self.train_files):
            raise ConfigError(f"data.train_files: need at least one path, got {self.train_files!r}")
        if self.template not in TEMPLATES:
            choices = "|".join(TEMPLATES)
            raise ConfigError(f"data.template: {self.template!r} is not one of {choices}")
        if self.seq_len < 2:
            raise ConfigError(f"data.seq_len: must be >= 2, got {self.seq_len}")
        if self.seed < 0:
            raise ConfigError(f"data.seed: must be >= 0, got {self.seed}")
