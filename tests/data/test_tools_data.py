"""The shipped demo data and tokenizer are exactly what their tools regenerate, and the tokenizer
tool's output loads through `load_tokenizer`."""

import subprocess
import sys
from pathlib import Path

from megarlhf.data.tokenizer import load_tokenizer

REPO = Path(__file__).parents[2]


def _tool(*args):
    subprocess.run([sys.executable, *args], cwd=REPO, check=True, capture_output=True)


def test_shipped_data_and_tokenizer_are_reproducible(tmp_path):
    _tool("tools/make_tiny_data.py", "--output", str(tmp_path / "sft.jsonl"))
    assert (tmp_path / "sft.jsonl").read_bytes() == (REPO / "data" / "sft_tiny.jsonl").read_bytes()
    _tool(
        "tools/train_tokenizer.py",
        "--input",
        str(tmp_path / "sft.jsonl"),
        "--vocab-size",
        "512",
        "--output",
        str(tmp_path / "tok"),
    )
    shipped = REPO / "data" / "tokenizer" / "tokenizer.model"
    assert (tmp_path / "tok" / "tokenizer.model").read_bytes() == shipped.read_bytes()


def test_train_tokenizer_on_plain_text(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 20 + "pack my box\n")
    _tool(
        "tools/train_tokenizer.py",
        "--input",
        str(text),
        "--vocab-size",
        "300",
        "--output",
        str(tmp_path / "out"),
    )
    tok = load_tokenizer(tmp_path / "out")
    assert tok.vocab_size == 300 and tok.eos_id == 3 and tok.pad_id == 0
    s = "the lazy fox ünïcode\nnew line"
    assert tok.decode(tok.encode(s)) == s
    assert len(tok.encode("the quick brown fox")) < len("the quick brown fox")  # it merged
