"""Writes the tiny reward-model ranking sets `data/rm_tiny.jsonl` and `data/rm_tiny_eval.jsonl`.

Prompts and their correct answers come from the SFT demonstration generator
(`tools/make_tiny_data.py`: arithmetic, capitals, opposites, plurals, notes, ...). Each prompt
gets K = 2..9 responses, each of a different quality tier, and the ranking a labeler following
"helpful first, then polite" would give:

    quality = 3 * topic + tone      topic: on-topic answer 2, refusal 1, off-topic answer 0
                                    tone:  polite +1, neutral 0, rude -1

so the nine tiers (on-topic polite / neutral / rude, refusal polite / neutral / rude, off-topic
polite / neutral / rude) have distinct qualities 7..-1 and every ranking is a strict order. An
off-topic response changes the subject ("Never mind that.") and then answers a (short) question of
another kind. About half of the K = 2 rows are written in the pairwise format ({"prompt",
"chosen", "rejected"}). Train and eval prompts are disjoint. The preference is separable and
learnable from the text alone (tone words, refusal phrases, deflections): the 2-layer model of
configs/rm_tiny.yaml orders over 90% of held-out pairs correctly after about 20 steps.

Only `random.Random(seed).random()` is used, so the files are byte-for-byte reproducible:

    python tools/make_tiny_rm_data.py --output data/rm_tiny.jsonl --eval-output \
        data/rm_tiny_eval.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.make_tiny_data import KINDS, Picker  # noqa: E402

POLITE_OPEN = ["Sure!", "Happy to help.", "Great question!", "Of course.", "Good question!"]
POLITE_CLOSE = [
    "I hope this helps!",
    "Let me know if you have another question.",
    "Have a lovely day!",
    "Thanks for asking.",
]
RUDE_OPEN = ["Ugh, fine.", "Seriously?", "Whatever.", "Obviously.", "How do you not know this?"]
RUDE_CLOSE = [
    "Stop asking me such basic things.",
    "Figure it out yourself next time.",
    "Don't waste my time.",
    "Even a child knows that.",
]
REFUSALS = [
    "I am not sure about that one.",
    "I cannot answer that question.",
    "I do not know the answer to that.",
]
POLITE_REFUSAL_CLOSE = [
    "Sorry! You could check a reference book.",
    "I apologize, maybe a teacher can help you.",
]
RUDE_REFUSALS = [
    "I don't know and I don't care.",
    "Not my problem. Ask someone else.",
    "Why would I tell you that? Go away.",
]
# An off-topic response changes the subject, then answers another question.
DEFLECTIONS = [
    "That reminds me of something else.",
    "Never mind that.",
    "Let's change the subject.",
    "Here is a fun fact instead.",
]
# (topic, tone) of the nine tiers; quality = 3 * topic + tone.
TIERS = [(topic, tone) for topic in (2, 1, 0) for tone in (1, 0, -1)]


def quality(tier: tuple[int, int]) -> int:
    return 3 * tier[0] + tier[1]


def _toned(p: Picker, core: str, tone: int) -> str:
    if tone == 0:
        return core
    opens, closes = (POLITE_OPEN, POLITE_CLOSE) if tone > 0 else (RUDE_OPEN, RUDE_CLOSE)
    which = p.index(3)  # 0: opening, 1: closing, 2: both
    sep = "\n" if "\n" in core else " "  # a letter gets its own lines
    head = p.choice(opens) + sep if which != 1 else ""
    tail = sep + p.choice(closes) if which != 0 else ""
    return head + core + tail


def _response(p: Picker, tier: tuple[int, int], answer: str, kind: int) -> str:
    topic, tone = tier
    if topic == 2:
        return _toned(p, answer, tone)
    if topic == 0:
        others = [f for i, f in enumerate(KINDS) if i != kind and f.__name__ != "_note"]
        return _toned(p, p.choice(DEFLECTIONS) + " " + p.choice(others)(p)[1], tone)
    if tone > 0:
        return p.choice(REFUSALS) + " " + p.choice(POLITE_REFUSAL_CLOSE)
    if tone < 0:
        return p.choice(RUDE_REFUSALS)
    return p.choice(REFUSALS)


def make_row(p: Picker, prompt: str, answer: str, kind: int) -> tuple[dict, list]:
    """One ranking row (K in 2..9 tiers drawn without replacement, responses shuffled), and the
    (topic, tone) tier of each response in the row's order."""
    k = p.integer(2, 9)
    pool = list(TIERS)
    tiers = [pool.pop(p.index(len(pool))) for _ in range(k)]
    while True:
        responses = [_response(p, t, answer, kind) for t in tiers]
        if len(set(responses)) == k:
            break
    order = sorted(range(k), key=lambda i: -quality(tiers[i]))
    ranking = [0] * k
    for rank, i in enumerate(order, 1):
        ranking[i] = rank
    if k == 2 and p.index(2) == 0:
        row = {"prompt": prompt, "chosen": responses[order[0]], "rejected": responses[order[1]]}
        return row, [tiers[order[0]], tiers[order[1]]]
    return {"prompt": prompt, "responses": responses, "ranking": ranking}, tiers


def make_rows(n: int, seed: int) -> list[tuple[dict, list]]:
    """`n` (row, tiers) with distinct prompts, cycling through the kinds of question."""
    p = Picker(seed)
    seen: set[str] = set()
    out: list[dict] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 100 * n:
            raise RuntimeError(f"could not draw {n} distinct prompts")
        kind = attempts % len(KINDS)
        prompt, answer = KINDS[kind](p)
        if prompt not in seen:
            seen.add(prompt)
            out.append(make_row(p, prompt, answer, kind))
    return out


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"wrote {len(rows)} rows to {path}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--output", default="data/rm_tiny.jsonl", help="training JSONL to write")
    ap.add_argument("--eval-output", default="data/rm_tiny_eval.jsonl", help="held-out JSONL")
    ap.add_argument("--num", type=int, default=320, help="training prompts")
    ap.add_argument("--num-eval", type=int, default=64, help="held-out prompts")
    ap.add_argument("--seed", type=int, default=1, help="generator seed")
    args = ap.parse_args(argv)
    rows = [row for row, _ in make_rows(args.num + args.num_eval, args.seed)]
    _write(Path(args.output), rows[: args.num])
    _write(Path(args.eval_output), rows[args.num :])


if __name__ == "__main__":
    main()
