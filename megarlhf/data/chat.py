"""Chat templates: turn a conversation into token ids plus a per-token "trained" flag.

A template renders a conversation as a list of `Segment`s, each a piece of text (tokenized on its
own) followed by literal token ids (BOS/EOS), marked trained or not. Tokenizing segment by segment
keeps the loss-mask boundary exact: no token straddles a prompt/response boundary, and a prompt
tokenized alone at generation time gives exactly the ids it had in training.

Three templates:

* `default_segments`, the built-in template, for tokenizers without one of their own::

      [BOS]System: {system}\\n\\nUser: {user}\\n\\nAssistant: {assistant}[EOS]User: ...

  The generation prompt is `Assistant:`; the space before the answer belongs to the (trained)
  response, as in GPT-2-style tokenizers where a word carries its leading space.
* `template_segments`, a Hugging Face folder's own Jinja chat template, split at turn boundaries
  by rendering growing prefixes of the conversation. That only works for templates whose
  rendering of the first k turns is a prefix of the rendering of the first k+1 (true of ChatML,
  Llama-2/3, Mistral, Gemma, ...); others are refused with a message naming the way out.
* `raw_segments`, for prompt/response rows that are already formatted:
  `[BOS]{prompt}{response}[EOS]` verbatim.

Trained tokens are an assistant turn's content and its end: EOS is appended to every assistant turn
(the default and raw templates) and trained on, so the model learns to stop. A Hugging Face template
that ends the turn with the EOS token itself (e.g. `<|im_end|>` in ChatML tokenizers whose EOS it
is) is trained through that token; template text after it (a newline) is untrained; a template
whose turn end is not the EOS token gets the EOS id appended.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

# Roles a message may have, in any order.
ROLES = ("system", "user", "assistant")

Message = dict  # {"role": one of ROLES, "content": str}


@dataclass(frozen=True)
class Segment:
    """A run of tokens with one trained flag: `text` tokenized alone, then the literal `ids`."""

    text: str
    trained: bool = False
    ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class ChatTokens:
    """Token ids of a formatted conversation; `trained[t]` marks tokens that are loss targets."""

    ids: list[int]
    trained: list[bool]


def check_messages(messages: Sequence[Message]) -> None:
    """Raise ValueError unless `messages` is a list of {"role", "content": str} dicts."""
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] is not an object")
        if m.get("role") not in ROLES:
            raise ValueError(f"messages[{i}].role is {m.get('role')!r}, not one of {ROLES}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}].content is not a string")


def default_segments(
    messages: Sequence[Message], bos_id: int | None, eos_id: int, add_generation_prompt: bool
) -> list[Segment]:
    """The built-in template (module docstring); assistant content + EOS are trained."""
    check_messages(messages)
    segs = [Segment("", ids=(bos_id,))] if bos_id is not None else []
    for m in messages:
        if m["role"] == "assistant":
            segs.append(Segment("Assistant:"))
            segs.append(Segment(" " + m["content"], trained=True, ids=(eos_id,)))
        else:
            segs.append(Segment(f"{m['role'].capitalize()}: {m['content']}\n\n"))
    if add_generation_prompt:
        segs.append(Segment("Assistant:"))
    return segs


def raw_segments(
    prompt: str, response: str | None, bos_id: int | None, eos_id: int
) -> list[Segment]:
    """`[BOS]{prompt}{response}[EOS]` verbatim; response + EOS trained. No response: the prompt."""
    segs = [Segment("", ids=(bos_id,))] if bos_id is not None else []
    segs.append(Segment(prompt))
    if response is not None:
        segs.append(Segment(response, trained=True, ids=(eos_id,)))
    return segs


def template_segments(
    render: Callable[[list, bool], str],
    messages: Sequence[Message],
    eos_text: str,
    eos_id: int,
    add_generation_prompt: bool,
) -> list[Segment]:
    """Split a Jinja chat template's rendering into untrained and trained (assistant) segments.

    Args:
        render: `render(messages, add_generation_prompt) -> str`, the tokenizer's template.
        messages: the conversation.
        eos_text: the EOS token as text; an assistant turn is trained through its last occurrence.
        eos_id: appended (trained) to an assistant turn that does not contain `eos_text`.
        add_generation_prompt: end with the template's generation prompt.
    """
    check_messages(messages)
    segs: list[Segment] = []
    done = ""  # rendering of the turns consumed so far
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = _render(render, messages[:i], True)
        full = _render(render, messages[: i + 1], False)
        _check_prefix(done, head, i)
        _check_prefix(head, full, i)
        segs.append(Segment(head[len(done) :]))
        turn = full[len(head) :]
        cut = turn.rfind(eos_text) if eos_text else -1
        if cut >= 0:
            end = cut + len(eos_text)
            segs.append(Segment(turn[:end], trained=True))
            if end < len(turn):
                segs.append(Segment(turn[end:]))
        else:
            segs.append(Segment(turn, trained=True, ids=(eos_id,)))
        done = full
    final = _render(render, messages, add_generation_prompt)
    _check_prefix(done, final, len(messages))
    if len(final) > len(done):
        segs.append(Segment(final[len(done) :]))
    return segs


def _render(render: Callable[[list, bool], str], messages, add_generation_prompt: bool) -> str:
    try:
        return render(list(messages), add_generation_prompt)
    except Exception as e:  # Jinja templates raise anything (e.g. "roles must alternate")
        raise ValueError(f"the tokenizer's chat template failed: {e}") from None


def _check_prefix(prefix: str, text: str, turn: int) -> None:
    if not text.startswith(prefix):
        raise ValueError(
            "the tokenizer's chat template is not prefix-consistent: the rendering of the turns "
            f"before message {turn} is not a prefix of the longer conversation (templates that "
            "rewrite earlier turns cannot be split into trained and untrained tokens); "
            "set data.template=default to use the built-in template"
        )


def through_last_trained(ids: Sequence[int], trained: Sequence[bool]) -> list[int]:
    """`ids` cut after the last trained token: a completion as a reward model scores it.

    A chat template may render text after the assistant turn's EOS (ChatML's newline after
    <|im_end|>). A policy's sampled response ends at the EOS, which is where PPO reads the
    reward; a reward model trained (and normalized) on the rendered text would read its score one
    token later, on a token PPO never shows it. Unchanged when nothing follows the last trained
    token (the raw format, templates that end with the EOS) or when nothing is trained.
    """
    last = max((i for i, t in enumerate(trained) if t), default=len(ids) - 1)
    return list(ids[: last + 1])


def encode_segments(segments: Sequence[Segment], encode: Callable[[str], list[int]]) -> ChatTokens:
    """Tokenize each segment's text on its own, append its literal ids, flag them all alike."""
    ids: list[int] = []
    trained: list[bool] = []
    for seg in segments:
        piece = (encode(seg.text) if seg.text else []) + list(seg.ids)
        ids += piece
        trained += [seg.trained] * len(piece)
    return ChatTokens(ids, trained)
