"""SFT data: JSONL rows -> validated, tokenized samples with a loss mask.

A row is `{"prompt": str, "response": str}` or `{"messages": [{"role", "content"}, ...]}` (roles
system/user/assistant; other keys are ignored). Pairs become one user turn and one assistant turn
(or, with `template="raw"`, prompt and response verbatim). Loss is on response tokens only: every
assistant turn's content plus the EOS appended to it; prompts, system and user turns and template
glue are context.

Bad input never passes silently. By default the first bad row raises `DataError` naming the file
and line (`data/x.jsonl:17: sample is 300 tokens, longer than data.seq_len=256`); with
`skip_invalid=True` bad rows are skipped and a count per reason is logged (and returned). Blank
lines are not rows and are ignored.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from megarlhf.data.chat import ROLES
from megarlhf.data.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """A bad data row or file. `where` is "file:line" (or the file), `reason` a short key."""

    def __init__(self, where: str, reason: str, message: str):
        super().__init__(f"{where}: {message}")
        self.where = where
        self.reason = reason


class _Invalid(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Sample:
    """One tokenized conversation.

    Attributes:
        input_ids: token ids, [L].
        loss_mask: [L]; loss_mask[t] says token t is a training target (predicted at t-1).
        source: "file:line" it came from.
    """

    input_ids: tuple[int, ...]
    loss_mask: tuple[bool, ...]
    source: str

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class SFTDataset:
    """Samples in file order, plus what was skipped (only with skip_invalid)."""

    samples: list[Sample]
    # Rows skipped per reason (e.g. {"too_long": 2}).
    skipped: dict[str, int] = field(default_factory=dict)
    # The first skipped row's full message per reason.
    first_skipped: dict[str, str] = field(default_factory=dict)


_JSON_TYPES = {dict: "an object", list: "a list", str: "a string"}


def _json_type(value) -> str:
    for tp, name in _JSON_TYPES.items():
        if isinstance(value, tp):
            return name
    return {bool: "a boolean", int: "a number", float: "a number"}.get(type(value), "null")


def _check_type(value, tp: type, name: str) -> None:
    if not isinstance(value, tp):
        raise _Invalid("wrong_type", f"{name} must be {_JSON_TYPES[tp]}, got {_json_type(value)}")


def _messages_of(row: dict) -> list[dict]:
    """Validated messages of a {"messages": [...]} row."""
    msgs = row["messages"]
    _check_type(msgs, list, "field 'messages'")
    for i, m in enumerate(msgs):
        _check_type(m, dict, f"messages[{i}]")
        for key in ("role", "content"):
            if key not in m:
                raise _Invalid("missing_field", f"messages[{i}] has no {key!r}")
            _check_type(m[key], str, f"messages[{i}].{key}")
        if m["role"] not in ROLES:
            raise _Invalid("bad_role", f"messages[{i}].role is {m['role']!r}, not one of {ROLES}")
        if m["role"] == "assistant" and not m["content"].strip():
            raise _Invalid("empty_response", f"messages[{i}] (assistant) has empty content")
    if not any(m["role"] == "assistant" for m in msgs):
        raise _Invalid("no_assistant_turn", "conversation has no assistant turn to train on")
    return msgs


def _tokenize_row(row, tokenizer: Tokenizer, template: str):
    """ChatTokens of a parsed JSON row, or _Invalid."""
    _check_type(row, dict, "row")
    if "messages" in row:
        if "prompt" in row or "response" in row:
            raise _Invalid("ambiguous_row", "row has both 'messages' and 'prompt'/'response'")
        msgs = _messages_of(row)
        if template == "raw":
            raise _Invalid("wrong_type", "data.template=raw supports prompt/response rows only")
        return tokenizer.tokenize_chat(msgs, template=template)
    for key in ("prompt", "response"):
        if key not in row:
            raise _Invalid(
                "missing_field",
                f"missing field {key!r} (a row needs 'prompt' and 'response', or 'messages')",
            )
        _check_type(row[key], str, f"field {key!r}")
    if not row["response"].strip():
        raise _Invalid("empty_response", "field 'response' is empty")
    return tokenizer.tokenize_pair(row["prompt"], row["response"], template=template)


def tokenize_line(
    line: bytes, tokenizer: Tokenizer, seq_len: int, template: str, source: str
) -> Sample:
    """Parse, validate and tokenize one JSONL line; raise DataError naming `source` if bad."""
    try:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _Invalid("not_utf8", f"not valid UTF-8 (byte {e.start})") from None
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            msg = f"malformed JSON: {e.msg} (column {e.colno})"
            raise _Invalid("malformed_json", msg) from None
        try:
            toks = _tokenize_row(row, tokenizer, template)
        except ValueError as e:  # a chat template that cannot render this conversation
            raise _Invalid("template_error", str(e)) from None
        if len(toks.ids) > seq_len:
            raise _Invalid(
                "too_long",
                f"sample is {len(toks.ids)} tokens, longer than data.seq_len={seq_len}",
            )
    except _Invalid as e:
        raise DataError(source, e.reason, str(e)) from None
    return Sample(tuple(toks.ids), tuple(toks.trained), source)


def load_sft_file(
    path: str, tokenizer: Tokenizer, seq_len: int, template: str = "auto", skip_invalid=False
) -> SFTDataset:
    """All samples of one JSONL file (see the module docstring for the bad-input policy)."""
    try:
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
    except OSError as e:
        raise DataError(path, "unreadable", f"cannot read data file ({e.strerror})") from None
    if lines and lines[0].startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark
        lines[0] = lines[0][3:]
    out = SFTDataset([])
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            sample = tokenize_line(line, tokenizer, seq_len, template, f"{path}:{lineno}")
        except DataError as e:
            if not skip_invalid:
                raise
            out.skipped[e.reason] = out.skipped.get(e.reason, 0) + 1
            out.first_skipped.setdefault(e.reason, str(e))
            continue
        out.samples.append(sample)
    for reason, n in out.skipped.items():
        logger.warning(
            "%s: skipped %d invalid row(s) (%s), first: %s",
            path,
            n,
            reason,
            out.first_skipped[reason],
        )
    return out


def load_sft_dataset(
    paths: Sequence[str],
    tokenizer: Tokenizer,
    seq_len: int,
    template: str = "auto",
    skip_invalid: bool = False,
) -> SFTDataset:
    """Samples of all files in order; raises DataError when none is usable."""
    out = SFTDataset([])
    for path in paths:
        part = load_sft_file(path, tokenizer, seq_len, template, skip_invalid)
        out.samples += part.samples
        for reason, n in part.skipped.items():
            out.skipped[reason] = out.skipped.get(reason, 0) + n
            out.first_skipped.setdefault(reason, part.first_skipped[reason])
    if not out.samples:
        skipped = sum(out.skipped.values())
        raise DataError(
            ", ".join(paths), "empty", f"no usable samples ({skipped} invalid rows skipped)"
        )
    if out.skipped:
        logger.warning(
            "SFT data: kept %d samples, skipped %d invalid rows: %s",
            len(out.samples),
            sum(out.skipped.values()),
            ", ".join(f"{k}={v}" for k, v in sorted(out.skipped.items())),
        )
    return out
