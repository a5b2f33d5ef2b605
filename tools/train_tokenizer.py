"""Train a sentencepiece tokenizer from text files; writes `DIR/tokenizer.model`.

    python tools/train_tokenizer.py --input a.txt b.jsonl --vocab-size 512 --output DIR

A `.jsonl` input is read as SFT data (`{"prompt","response"}` or `{"messages": [...]}` rows) and
each row is rendered with the built-in chat template, so the template's words ("User:",
"Assistant:") get pieces of their own; any other file is plain text, one sentence per line.

The model suits `megarlhf.data.tokenizer.load_tokenizer(DIR)` and the SFT pipeline: ids 0..3 are
`<pad>`, `<unk>`, `<s>` (BOS), `</s>` (EOS); byte fallback makes every string encodable and
decoding exact; text is not normalized and has no dummy leading space, so segments tokenized
separately concatenate exactly; "\\n" is a piece; digits are split one per piece. Training runs on
one thread with the whole input, so the same input gives the same model file.

A missing or malformed input, or a vocabulary size sentencepiece cannot train, is one line
`train_tokenizer.py: error: ...` and exit 2.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

from megarlhf.data.chat import default_segments

PROG = "train_tokenizer.py"


class TokenizerInputError(ValueError):
    """An input file is missing or malformed, or the vocabulary cannot be trained from it."""


def read_sentences(paths: list[str]) -> list[str]:
    """Training sentences: lines of text files, chat-rendered rows of `.jsonl` files."""
    out: list[str] = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                lines = list(f)
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerInputError(f"--input {path}: cannot read it ({e})") from None
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            if not path.endswith(".jsonl"):
                out.append(line.rstrip("\n"))
                continue
            try:
                row = json.loads(line)
                msgs = row.get("messages") or [
                    {"role": "user", "content": row["prompt"]},
                    {"role": "assistant", "content": row["response"]},
                ]
                segs = default_segments(msgs, None, 0, False)
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise TokenizerInputError(f"{path}:{lineno}: not an SFT row ({e})") from None
            out.append("".join(s.text for s in segs))
    if not out:
        raise TokenizerInputError(f"no text in {', '.join(paths)}")
    return out


def train(sentences: list[str], vocab_size: int, model_type: str, byte_fallback: bool) -> bytes:
    """The serialized sentencepiece model trained on `sentences`."""
    import sentencepiece as spm

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=1.0,
            byte_fallback=byte_fallback,
            pad_id=0,
            unk_id=1,
            bos_id=2,
            eos_id=3,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            user_defined_symbols=["\n"],
            split_digits=True,
            max_sentence_length=1 << 16,
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as e:  # e.g. "Vocabulary size too high (9000). Please set it to ..."
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
        raise TokenizerInputError(f"--vocab-size {vocab_size}: sentencepiece: {msg}") from None
    return model.getvalue()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    ap.add_argument("--input", nargs="+", required=True, help="text or .jsonl files")
    ap.add_argument("--vocab-size", type=int, default=512, help="number of pieces")
    ap.add_argument("--output", required=True, help="folder to write tokenizer.model into")
    ap.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    ap.add_argument(
        "--no-byte-fallback", action="store_true", help="map unseen characters to <unk>"
    )
    args = ap.parse_args(argv)
    try:
        data = train(
            read_sentences(args.input), args.vocab_size, args.model_type, not args.no_byte_fallback
        )
        out = Path(args.output)
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / "tokenizer.model").write_bytes(data)
        except OSError as e:
            raise TokenizerInputError(f"--output {out}: cannot write it ({e})") from None
    except TokenizerInputError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out / 'tokenizer.model'} ({args.vocab_size} pieces, {len(data)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
