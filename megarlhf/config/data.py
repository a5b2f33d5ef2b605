"""Data configuration of the three stages (the `data:` section): SFT demonstrations, RM rankings,
PPO prompts and PTX text. Tokenizer and formatting are one inline section they share."""

from __future__ import annotations

from dataclasses import dataclass, field

from megarlhf.config.loader import check, check_choice, inline
from megarlhf.data.tokenizer import TEMPLATES

# Most completions per prompt the InstructGPT labeling interface showed.
MAX_K = 9


def _check_files(files: list[str], key: str) -> None:
    ok = bool(files) and all(isinstance(f, str) and f for f in files)
    check(ok, key, f"need at least one path, got {files!r}")


@dataclass
class TextFormatConfig:
    """How text becomes token ids: the tokenizer and the prompt/response formatting."""

    # Tokenizer: a sentencepiece .model file, a folder with tokenizer.model, or a HF folder.
    tokenizer: str = "data/tokenizer"
    # Formatting: "auto" (the tokenizer's own chat template, else the built-in one), "default"
    # (always the built-in one) or "raw" (prompt + response verbatim; prompt/response rows only).
    template: str = "auto"

    def __post_init__(self) -> None:
        check_choice(self.template, TEMPLATES, "template")


@dataclass
class DatasetConfig:
    """What SFT and RM data share: files, formatting, length, bad-input policy, seed."""

    # JSONL files of the stage's rows (see the subclasses).
    train_files: list[str] = field(default_factory=list)
    # Tokenizer and formatting of prompt + response.
    text: TextFormatConfig = inline(TextFormatConfig)
    # Longest sample in tokens (SFT: a training row; RM: prompt + response, EOS included); a
    # longer one is invalid. At most model.max_seq_len.
    seq_len: int = 256
    # Skip invalid rows, logging a count per reason, instead of failing on the first one.
    skip_invalid: bool = False
    # Seed of every epoch's order (and of SFT's packing shuffle).
    seed: int = 1234

    def __post_init__(self) -> None:
        _check_files(self.train_files, "train_files")
        check(self.seq_len >= 2, "seq_len", f"must be >= 2, got {self.seq_len}")
        check(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")


@dataclass
class DataConfig(DatasetConfig):
    """SFT data: {"prompt", "response"} or {"messages": [{"role", "content"}, ...]} rows, packed
    into rows of seq_len tokens."""

    train_files: list[str] = field(default_factory=lambda: ["data/sft_tiny.jsonl"])
    # Pack several samples into each row (greedy first-fit); false: one padded sample per row.
    pack: bool = True


@dataclass
class RMDataConfig(DatasetConfig):
    """Ranking data: {"prompt", "responses", "ranking"} or {"prompt", "chosen", "rejected"}
    rows."""

    train_files: list[str] = field(default_factory=lambda: ["data/rm_tiny.jsonl"])
    # Most responses per prompt (K); a row with more is invalid.
    max_k: int = MAX_K

    def __post_init__(self) -> None:
        super().__post_init__()
        check(2 <= self.max_k <= 64, "max_k", f"must be in [2, 64], got {self.max_k}")


@dataclass
class PPODataConfig:
    """Prompts to answer, the pretraining (PTX) corpus, tokenizer and formatting."""

    # JSONL files of {"prompt": str} rows (other keys, e.g. "response", are ignored).
    prompt_files: list[str] = field(default_factory=lambda: ["data/ppo_prompts_tiny.jsonl"])
    # Plain-text files for the PTX loss, one document per non-empty line; empty: no PTX data.
    ptx_files: list[str] = field(default_factory=list)
    # Tokenizer and formatting of a prompt, as in SFT.
    text: TextFormatConfig = inline(TextFormatConfig)
    # Longest tokenized prompt; prompt + generation.max_new_tokens must fit model.max_seq_len.
    max_prompt_len: int = 64
    # Tokens per PTX sequence (documents are concatenated and cut into rows of this length).
    ptx_seq_len: int = 64
    # Seed of every epoch's prompt order and of the PTX row order.
    seed: int = 1234

    def __post_init__(self) -> None:
        _check_files(self.prompt_files, "prompt_files")
        check(self.max_prompt_len >= 1, "max_prompt_len", "must be >= 1")
        check(self.ptx_seq_len >= 2, "ptx_seq_len", "must be >= 2")
        check(self.seed >= 0, "seed", "must be >= 0")
