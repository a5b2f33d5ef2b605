"""Data configuration of the three stages (the `data:` section): SFT demonstrations, RM rankings,
PPO prompts and PTX text. Tokenizer and formatting are one inline section they share, and so are
the rows' shape and column names (`data.format`, `data.fields.<field>`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from megarlhf.config.loader import check, check_choice, inline
from megarlhf.data.formats import FORMATS, RM_FORMATS
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
class FieldsConfig:
    """The column each field is read from (`data.fields.prompt=question`); defaults: its name."""

    # The prompt: text (prompt/response, pairwise and ranking rows; PPO prompts).
    prompt: str = "prompt"
    # A demonstration's response (SFT prompt/response rows).
    response: str = "response"
    # A conversation: a list of {"role", "content"} messages.
    messages: str = "messages"
    # The preferred response: text, a whole HH transcript, or a list of messages.
    chosen: str = "chosen"
    # The dispreferred response, in the same shape as chosen.
    rejected: str = "rejected"
    # A ranking row's K responses.
    responses: str = "responses"
    # A ranking row's ranks, 1 = best.
    ranking: str = "ranking"

    def __post_init__(self) -> None:
        seen: dict[str, str] = {}
        for name, column in vars(self).items():
            check(isinstance(column, str) and column != "", name, "must be a column name")
            other = seen.setdefault(column, name)
            check(other == name, name, f"column {column!r} is already data.fields.{other}")


@dataclass
class RowsConfig:
    """What the data rows look like: their shape and where each field is."""

    # Row shape: "auto" (detected per row) or one of prompt_response, messages, chosen_rejected,
    # ranking, hh (Anthropic HH-RLHF transcripts), chosen_rejected_messages (UltraFeedback
    # style); docs/data.md has each and the detection rules.
    format: str = "auto"
    # Column names of the fields, a nested section: data.fields.prompt=question.
    fields: FieldsConfig = field(default_factory=FieldsConfig)

    def __post_init__(self) -> None:
        check_choice(self.format, FORMATS, "format")


@dataclass
class DatasetConfig:
    """What SFT and RM data share: files, formatting, length, bad-input policy, seed."""

    # Data files of the stage's rows (see the subclasses): JSONL, JSON, Parquet, Arrow, or
    # datasets save_to_disk folders.
    train_files: list[str] = field(default_factory=list)
    # Tokenizer and formatting of prompt + response.
    text: TextFormatConfig = inline(TextFormatConfig)
    # Shape and column names of the rows.
    rows: RowsConfig = inline(RowsConfig)
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
    """SFT data: {"prompt", "response"} or {"messages": [{"role", "content"}, ...]} rows (or the
    best response of preference rows), packed into rows of seq_len tokens."""

    train_files: list[str] = field(default_factory=lambda: ["data/sft_tiny.jsonl"])
    # Pack several samples into each row (greedy first-fit); false: one padded sample per row.
    pack: bool = True


@dataclass
class RMDataConfig(DatasetConfig):
    """Ranking data: {"prompt", "responses", "ranking"} or {"prompt", "chosen", "rejected"}
    rows, HH-RLHF transcripts or chat-message pairs."""

    train_files: list[str] = field(default_factory=lambda: ["data/rm_tiny.jsonl"])
    # Most responses per prompt (K); a row with more is invalid.
    max_k: int = MAX_K

    def __post_init__(self) -> None:
        super().__post_init__()
        check(2 <= self.max_k <= 64, "max_k", f"must be in [2, 64], got {self.max_k}")
        fmt = self.rows.format
        ok = fmt in RM_FORMATS
        check(ok, "format", f"{fmt!r} has no responses to rank (use {'|'.join(RM_FORMATS)})")


@dataclass
class PPODataConfig:
    """Prompts to answer, the pretraining (PTX) corpus, tokenizer and formatting."""

    # Files of prompt rows, {"prompt": str} (other keys, e.g. "response", are ignored) or any row
    # shape's prompt part; JSONL, JSON, Parquet, Arrow or save_to_disk folders.
    prompt_files: list[str] = field(default_factory=lambda: ["data/ppo_prompts_tiny.jsonl"])
    # Plain-text files for the PTX loss, one document per non-empty line; empty: no PTX data.
    ptx_files: list[str] = field(default_factory=list)
    # Tokenizer and formatting of a prompt, as in SFT.
    text: TextFormatConfig = inline(TextFormatConfig)
    # Shape and column names of the prompt rows.
    rows: RowsConfig = inline(RowsConfig)
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
