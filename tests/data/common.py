"""A character-level tokenizer whose ids are hand-computable (id = code point)."""

from megarlhf.data.tokenizer import Tokenizer

EOS, BOS, PAD = 1, 2, 0


class CharTokenizer(Tokenizer):
    """ord() per character; EOS=1, BOS=2 (or none), PAD=0."""

    def __init__(self, bos: bool = True):
        self.path = "<chars>"
        self.vocab_size = 0x110000
        self.eos_id, self.pad_id = EOS, PAD
        self.bos_id = BOS if bos else None

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids if i > 2)


def ords(text: str) -> list[int]:
    return [ord(c) for c in text]
