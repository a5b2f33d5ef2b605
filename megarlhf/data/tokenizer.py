"""Tokenizers behind one small interface: a sentencepiece model file or a Hugging Face folder.

`load_tokenizer(path)` picks the implementation from what `path` is:

* a file (e.g. `tokenizer.model`), or a folder holding only `tokenizer.model`: sentencepiece;
* a folder with `tokenizer.json` or `tokenizer_config.json`: Hugging Face
  (`transformers.AutoTokenizer`, local files only, nothing is downloaded).

`encode` never adds special tokens; BOS/EOS are placed by the chat template (`chat.py`), which is
the folder's own Jinja template when it has one (`template="auto"`) and the built-in default
otherwise. Simplification: a sentencepiece model trained with `add_dummy_prefix` (e.g. LLaMA's)
puts a leading-space piece at the start of every separately tokenized segment; that is consistent
between training and generation, only not identical to tokenizing the whole text at once. Models
trained by `tools/train_tokenizer.py` have no dummy prefix, so segments concatenate exactly.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

from megarlhf.data.chat import (
    ChatTokens,
    Message,
    default_segments,
    encode_segments,
    raw_segments,
    template_segments,
)

# data.template values: the tokenizer's own chat template if any ("auto"), the built-in default
# ("default"), or prompt + response verbatim ("raw", prompt/response rows only).
TEMPLATES = ("auto", "default", "raw")


class TokenizerError(ValueError):
    """A tokenizer path or file cannot be used; the message names it."""


class Tokenizer(ABC):
    """Text <-> ids, the special ids, and chat formatting with a loss mask.

    Attributes:
        path: where the tokenizer was loaded from.
        vocab_size: number of ids (including added special tokens); ids are in [0, vocab_size).
        eos_id: end of sequence; appended to each response and trained on.
        pad_id: filler of padded positions (the EOS id when the tokenizer has no pad token).
        bos_id: beginning of sequence, or None when the tokenizer has none.
    """

    path: str
    vocab_size: int
    eos_id: int
    pad_id: int
    bos_id: int | None

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids of `text`, without any special tokens added."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`."""

    @property
    def has_chat_template(self) -> bool:
        """Whether the tokenizer brings its own chat template."""
        return False

    def _own_template_segments(self, messages, add_generation_prompt):
        raise NotImplementedError

    def tokenize_chat(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = False,
        template: str = "auto",
    ) -> ChatTokens:
        """Ids of a conversation and which of them are trained (assistant turns and their EOS).

        Args:
            messages: [{"role": "system"|"user"|"assistant", "content": str}, ...].
            add_generation_prompt: end with the prompt that asks the model for an assistant turn.
            template: "auto" (own template if any, else default) or "default".
        """
        if template == "auto" and self.has_chat_template:
            segs = self._own_template_segments(messages, add_generation_prompt)
        elif template in ("auto", "default"):
            segs = default_segments(messages, self.bos_id, self.eos_id, add_generation_prompt)
        else:
            raise ValueError(f"template {template!r} cannot format messages (use auto|default)")
        return encode_segments(segs, self.encode)

    def tokenize_pair(
        self, prompt: str, response: str | None = None, template: str = "auto"
    ) -> ChatTokens:
        """A prompt/response pair as one user turn and one assistant turn (or `raw`: verbatim).

        With `response=None` this is the generation prompt (ids only, nothing trained), exactly
        the prefix the pair has in training.
        """
        if template == "raw":
            return encode_segments(
                raw_segments(prompt, response, self.bos_id, self.eos_id), self.encode
            )
        if template not in TEMPLATES:
            raise ValueError(f"template {template!r} is not one of {TEMPLATES}")
        msgs = [{"role": "user", "content": prompt}]
        if response is not None:
            msgs.append({"role": "assistant", "content": response})
        return self.tokenize_chat(msgs, add_generation_prompt=response is None, template=template)


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model file (`*.model`)."""

    def __init__(self, model_file: str | Path):
        import sentencepiece as spm

        self.path = str(model_file)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=self.path)
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{self.path}: not a sentencepiece model ({e})") from None
        self.vocab_size = self._sp.get_piece_size()
        if self._sp.eos_id() < 0:
            raise TokenizerError(f"{self.path}: sentencepiece model has no EOS piece")
        self.eos_id = self._sp.eos_id()
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer folder, loaded from local files only."""

    def __init__(self, folder: str | Path):
        from transformers import AutoTokenizer

        self.path = str(folder)
        try:
            self._tok = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise TokenizerError(f"{self.path}: cannot load Hugging Face tokenizer ({e})") from None
        if self._tok.eos_token_id is None:
            raise TokenizerError(f"{self.path}: tokenizer has no eos_token")
        self.vocab_size = len(self._tok)
        self.eos_id = int(self._tok.eos_token_id)
        self.bos_id = None if self._tok.bos_token_id is None else int(self._tok.bos_token_id)
        pad = self._tok.pad_token_id
        self.pad_id = self.eos_id if pad is None else int(pad)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids])

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._tok, "chat_template", None))

    def _render(self, messages: list, add_generation_prompt: bool) -> str:
        return self._tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _own_template_segments(self, messages, add_generation_prompt):
        return template_segments(
            self._render, messages, self._tok.eos_token, self.eos_id, add_generation_prompt
        )


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a sentencepiece model (file, or folder with `tokenizer.model`) or a HF folder."""
    p = Path(path)
    if p.is_file():
        return SentencePieceTokenizer(p)
    if p.is_dir():
        if (p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file():
            return HFTokenizer(p)
        if (p / "tokenizer.model").is_file():
            return SentencePieceTokenizer(p / "tokenizer.model")
        raise TokenizerError(
            f"{p}: no tokenizer found (expected tokenizer.model for sentencepiece, or "
            "tokenizer.json / tokenizer_config.json for a Hugging Face folder)"
        )
    raise TokenizerError(f"{p}: tokenizer path does not exist")
