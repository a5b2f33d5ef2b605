"""Row shapes: what a data row holds, detected per row or named by `data.format`, turned into the
one form (`Example`) the SFT, RM and PPO loaders read, and tokenized from there.

Shapes (field names are the defaults; `data.fields.<field>=<column>` renames any of them):

* `prompt_response`: {"prompt": str, "response": str} (PPO: just "prompt");
* `messages`: {"messages": [{"role", "content"}, ...]}, roles system/user/assistant;
* `chosen_rejected`: {"prompt": str, "chosen": str, "rejected": str}, a K = 2 ranking;
* `ranking`: {"prompt": str, "responses": [str, ...], "ranking": [int, ...]} (1 = best);
* `hh` (Anthropic HH-RLHF): {"chosen": str, "rejected": str}, each a whole transcript
  "\\n\\nHuman: ...\\n\\nAssistant: ..."; their shared turns are the prompt, their last assistant
  turns the responses (Human -> user, Assistant -> assistant; each turn's text stripped);
* `chosen_rejected_messages` (UltraFeedback-binarized style): {"chosen": [messages],
  "rejected": [messages]}; each ends with the assistant's response, the messages before it (the
  same in both) are the prompt.

`auto` detects the shape of each row: a row with "chosen" or "rejected" is
`chosen_rejected_messages` if that field is a list, else `chosen_rejected` if it has a "prompt",
else `hh`; otherwise a row with "responses" or "ranking" (and every other row, for the RM) is
`ranking`; otherwise one with "messages" is `messages` (a row that also has "prompt" or "response"
is ambiguous: name its shape); otherwise `prompt_response`.

What each stage takes: SFT a demonstration (a `messages` conversation, every assistant turn
trained; else the prompt and the best-ranked response), the RM the K >= 2 responses to compare,
PPO the prompt (a conversation's prompt is its messages before a final assistant turn).
Simplification: message keys other than role and content are dropped.
"""

from __future__ import annotations

import re
import reprlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from megarlhf.data.chat import ROLES, ChatTokens, Message
from megarlhf.data.errors import Invalid

if TYPE_CHECKING:
    from megarlhf.config.data import FieldsConfig
    from megarlhf.data.tokenizer import Tokenizer

# data.format values: "auto" (per row, as in the module docstring) or a shape.
SHAPES = (
    "prompt_response",
    "messages",
    "chosen_rejected",
    "ranking",
    "hh",
    "chosen_rejected_messages",
)
FORMATS = ("auto", *SHAPES)
# Shapes with responses to compare: the reward model's.
RM_FORMATS = ("auto", "chosen_rejected", "ranking", "hh", "chosen_rejected_messages")
# Who reads the rows: SFT demonstrations, RM rankings, PPO prompts.
STAGES = ("sft", "rm", "ppo")
RAW_ONLY = "data.template=raw supports prompt/response rows only"


@dataclass(frozen=True)
class Example:
    """One row in the form every stage reads.

    Attributes:
        prompt: a text prompt, one user turn (prompt_response, chosen_rejected, ranking rows), or
            the conversation before the response (messages, hh, chosen_rejected_messages).
        responses: candidate responses to `prompt`, in row order; () for a prompt-only row.
        ranks: rank of each response, 1 = best.
        conversation: a `messages` row's whole conversation (SFT trains every assistant turn of
            it), else None.
    """

    prompt: str | tuple[Message, ...]
    responses: tuple[str, ...] = ()
    ranks: tuple[int, ...] = ()
    conversation: tuple[Message, ...] | None = None


# ----------------------------------------------------------------------------- checks

_JSON_TYPES = {dict: "an object", list: "a list", str: "a string"}


def json_type(value: Any) -> str:
    """The JSON name of a value's type ("an object", "a number", "null", ...)."""
    for tp, name in _JSON_TYPES.items():
        if isinstance(value, tp):
            return name
    return {bool: "a boolean", int: "a number", float: "a number"}.get(type(value), "null")


def check_type(value: Any, tp: type, name: str) -> None:
    """Invalid("wrong_type") unless `value` is a `tp` (dict, list or str)."""
    if not isinstance(value, tp):
        raise Invalid("wrong_type", f"{name} must be {_JSON_TYPES[tp]}, got {json_type(value)}")


def check_messages(value: Any, name: str) -> tuple[Message, ...]:
    """The validated conversation in field `name`: {"role", "content"} objects, no empty
    assistant turn (other keys dropped)."""
    check_type(value, list, f"field {name!r}")
    out = []
    for i, m in enumerate(value):
        check_type(m, dict, f"{name}[{i}]")
        for key in ("role", "content"):
            if key not in m:
                raise Invalid("missing_field", f"{name}[{i}] has no {key!r}")
            check_type(m[key], str, f"{name}[{i}].{key}")
        if m["role"] not in ROLES:
            raise Invalid("bad_role", f"{name}[{i}].role is {m['role']!r}, not one of {ROLES}")
        if m["role"] == "assistant" and not m["content"].strip():
            raise Invalid("empty_response", f"{name}[{i}] (assistant) has empty content")
        out.append({"role": m["role"], "content": m["content"]})
    return tuple(out)


def check_ranking(responses: Sequence[str], ranks: Sequence[int], max_k: int) -> None:
    """K in [2, max_k] distinct non-empty responses ranked by a permutation of 1..K."""
    k = len(responses)
    if k < 2:
        raise Invalid("too_few_responses", f"needs at least 2 responses to compare, got {k}")
    if k > max_k:
        raise Invalid("too_many_responses", f"{k} responses exceed data.max_k={max_k}")
    if len(ranks) != k:
        raise Invalid("bad_ranking", f"ranking has {len(ranks)} entries for {k} responses")
    for i, r in enumerate(responses):
        if not r.strip():
            raise Invalid("empty_response", f"responses[{i}] is empty")
    first: dict[int, int] = {}
    for i, r in enumerate(ranks):
        if r in first:
            raise Invalid(
                "tie",
                f"responses[{first[r]}] and responses[{i}] are tied at rank {r}; ties are not "
                "supported (break the tie or drop one response)",
            )
        first[r] = i
    if sorted(ranks) != list(range(1, k + 1)):
        raise Invalid("bad_ranking", f"ranking {list(ranks)} is not a permutation of 1..{k}")
    seen: dict[str, int] = {}
    for i, r in enumerate(responses):
        if r in seen:
            raise Invalid(
                "duplicate_response", f"responses[{seen[r]}] and responses[{i}] are identical"
            )
        seen[r] = i


def _text(row: dict, key: str, missing: str) -> str:
    if key not in row:
        raise Invalid("missing_field", missing)
    check_type(row[key], str, f"field {key!r}")
    return row[key]


def _pair(row: dict, f: FieldsConfig, tp: type) -> tuple[Any, Any]:
    """The chosen and rejected fields, each a `tp`."""
    for key in (f.chosen, f.rejected):
        if key not in row:
            raise Invalid("missing_field", f"pairwise row has no {key!r}")
        check_type(row[key], tp, f"field {key!r}")
    return row[f.chosen], row[f.rejected]


def prompt_of(conversation: tuple[Message, ...]) -> tuple[Message, ...]:
    """A conversation's prompt: its messages before a final assistant turn (all if none)."""
    if conversation and conversation[-1]["role"] == "assistant":
        return conversation[:-1]
    return conversation


# ----------------------------------------------------------------------------- shapes


def _prompt_response(row: dict, f: FieldsConfig, stage: str, auto: bool) -> Example:
    if stage == "ppo":
        need = f"(a prompt row needs {f.prompt!r}, or {f.messages!r})"
        return Example(_text(row, f.prompt, f"missing field {f.prompt!r} {need}"))
    need = f"(a row needs {f.prompt!r} and {f.response!r}, or {f.messages!r})"
    prompt = _text(row, f.prompt, f"missing field {f.prompt!r} {need}")
    response = _text(row, f.response, f"missing field {f.response!r} {need}")
    if not response.strip():
        raise Invalid("empty_response", f"field {f.response!r} is empty")
    return Example(prompt, (response,), (1,))


def _messages(row: dict, f: FieldsConfig, stage: str, auto: bool) -> Example:
    if auto and (f.prompt in row or f.response in row):
        raise Invalid(
            "ambiguous_row",
            f"row has both {f.messages!r} and {f.prompt!r}/{f.response!r} (say which with "
            "data.format=messages or data.format=prompt_response)",
        )
    if f.messages not in row:
        raise Invalid("missing_field", f"missing field {f.messages!r}")
    conversation = check_messages(row[f.messages], f.messages)
    if stage == "sft" and not any(m["role"] == "assistant" for m in conversation):
        raise Invalid("no_assistant_turn", "conversation has no assistant turn to train on")
    return Example(prompt_of(conversation), conversation=conversation)


def _chosen_rejected(row: dict, f: FieldsConfig, stage: str, auto: bool) -> Example:
    prompt = _text(row, f.prompt, f"missing field {f.prompt!r}")
    return Example(prompt, _pair(row, f, str), (1, 2))


def _ranking(row: dict, f: FieldsConfig, stage: str, auto: bool) -> Example:
    prompt = _text(row, f.prompt, f"missing field {f.prompt!r}")
    for key in (f.responses, f.ranking):
        if key not in row:
            raise Invalid(
                "missing_field",
                f"missing field {key!r} (a row needs {f.responses!r} and {f.ranking!r}, or "
                f"{f.chosen!r} and {f.rejected!r})",
            )
        check_type(row[key], list, f"field {key!r}")
    responses, ranks = row[f.responses], row[f.ranking]
    for i, r in enumerate(responses):
        check_type(r, str, f"{f.responses}[{i}]")
    if not all(isinstance(r, int) and not isinstance(r, bool) for r in ranks):
        raise Invalid(
            "wrong_type", f"{f.ranking} must be a list of integers, got {reprlib.repr(ranks)}"
        )
    return Example(prompt, tuple(responses), tuple(ranks))


# A turn marker of an HH transcript: at the start of the text or after a blank line.
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def hh_turns(text: str, name: str) -> tuple[Message, ...]:
    """The turns of an HH transcript ("\\n\\nHuman: ...\\n\\nAssistant: ..."), text stripped."""
    parts = _HH_TURN.split(text.lstrip())
    if len(parts) < 3 or parts[0]:
        raise Invalid(
            "bad_transcript",
            f"field {name!r} is not an HH transcript ('\\n\\nHuman: ...\\n\\nAssistant: ...')",
        )
    return tuple(
        {"role": _HH_ROLES[role], "content": content.strip()}
        for role, content in zip(parts[1::2], parts[2::2], strict=True)
    )


def _shared_prompt(chosen, rejected, f: FieldsConfig) -> Example:
    """The K = 2 example of two conversations that differ only in their final assistant turn."""
    for turns, key in ((chosen, f.chosen), (rejected, f.rejected)):
        if not turns or turns[-1]["role"] != "assistant":
            raise Invalid("no_assistant_turn", f"field {key!r} does not end with an assistant turn")
    if chosen[:-1] != rejected[:-1]:
        raise Invalid(
            "prompt_mismatch",
            f"fields {f.chosen!r} and {f.rejected!r} differ before their last assistant turn "
            "(the turns they share are the prompt)",
        )
    return Example(chosen[:-1], (chosen[-1]["content"], rejected[-1]["content"]), (1, 2))


def _hh(row: dict, f: FieldsConfig, stage: str, auto: bool) -> Example:
    chosen, rejected = _pair(row, f, str)
    return _shared_prompt(hh_turns(chosen, f.chosen), hh_turns(rejected, f.rejected), f)


def _chat_pair(row: dict, f: FieldsConfig, stage: str, auto: bool) -> Example:
    chosen, rejected = _pair(row, f, list)
    return _shared_prompt(check_messages(chosen, f.chosen), check_messages(rejected, f.rejected), f)


# shape -> parser(row, fields, stage, auto) -> Example
PARSERS: dict[str, Callable[[dict, Any, str, bool], Example]] = {
    "prompt_response": _prompt_response,
    "messages": _messages,
    "chosen_rejected": _chosen_rejected,
    "ranking": _ranking,
    "hh": _hh,
    "chosen_rejected_messages": _chat_pair,
}


def detect_shape(row: dict, f: FieldsConfig, stage: str) -> str:
    """The shape of a row under data.format=auto (rules in the module docstring)."""
    if f.chosen in row or f.rejected in row:
        if isinstance(row.get(f.chosen, row.get(f.rejected)), list):
            return "chosen_rejected_messages"
        return "chosen_rejected" if f.prompt in row else "hh"
    if stage == "rm" or f.responses in row or f.ranking in row:
        return "ranking"
    return "messages" if f.messages in row else "prompt_response"


def parse_row(row: Any, fmt: str, f: FieldsConfig, stage: str) -> Example:
    """The Example of one row of shape `fmt` ("auto": detected); Invalid if it is bad."""
    check_type(row, dict, "row")
    shape = detect_shape(row, f, stage) if fmt == "auto" else fmt
    return PARSERS[shape](row, f, stage, fmt == "auto")


# ----------------------------------------------------------------------------- tokens


def _tokenize(fn: Callable[[], ChatTokens]) -> ChatTokens:
    try:
        return fn()
    except ValueError as e:  # a chat template that cannot render this conversation
        raise Invalid("template_error", str(e)) from None


def completion_tokens(
    tokenizer: Tokenizer, prompt: str | tuple[Message, ...], response: str, template: str
) -> ChatTokens:
    """Prompt + response as formatted for training (a text prompt as one user turn, or `raw`)."""
    if isinstance(prompt, str):
        return _tokenize(lambda: tokenizer.tokenize_pair(prompt, response, template=template))
    if template == "raw":
        raise Invalid("wrong_type", RAW_ONLY)
    msgs = [*prompt, {"role": "assistant", "content": response}]
    return _tokenize(lambda: tokenizer.tokenize_chat(msgs, template=template))


def conversation_tokens(
    tokenizer: Tokenizer, conversation: tuple[Message, ...], template: str
) -> ChatTokens:
    """A whole conversation, every assistant turn trained."""
    if template == "raw":
        raise Invalid("wrong_type", RAW_ONLY)
    return _tokenize(lambda: tokenizer.tokenize_chat(list(conversation), template=template))


def prompt_tokens(
    tokenizer: Tokenizer, prompt: str | tuple[Message, ...], template: str
) -> ChatTokens:
    """The generation prompt: exactly the prefix `completion_tokens` gives the prompt."""
    if isinstance(prompt, str):
        return _tokenize(lambda: tokenizer.tokenize_pair(prompt, template=template))
    if template == "raw":
        raise Invalid("wrong_type", RAW_ONLY)
    return _tokenize(
        lambda: tokenizer.tokenize_chat(list(prompt), add_generation_prompt=True, template=template)
    )
