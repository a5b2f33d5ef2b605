"""Writes the tiny SFT demonstration set `data/sft_tiny.jsonl` (prompt/response pairs).

The pairs are generated, not downloaded: a dozen kinds of short English questions (arithmetic,
capitals, opposites, plurals, unit conversions, spelling, short notes, ...) with their answers,
drawn deterministically from a fixed seed. Only `random.Random(seed).random()` is used, whose
sequence Python guarantees across versions, so the file is byte-for-byte reproducible:

    python tools/make_tiny_data.py --output data/sft_tiny.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("Japan", "Tokyo"), ("Canada", "Ottawa"), ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
    ("Poland", "Warsaw"), ("Greece", "Athens"), ("Ireland", "Dublin"), ("Austria", "Vienna"),
    ("Chile", "Santiago"), ("India", "New Delhi"), ("Australia", "Canberra"),
    ("Argentina", "Buenos Aires"), ("Mexico", "Mexico City"), ("Turkey", "Ankara"),
]  # fmt: skip
OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("early", "late"),
    ("light", "dark"), ("open", "closed"), ("full", "empty"), ("strong", "weak"),
    ("loud", "quiet"), ("young", "old"), ("rich", "poor"), ("wet", "dry"), ("high", "low"),
]  # fmt: skip
PLURALS = [
    ("mouse", "mice"), ("child", "children"), ("tooth", "teeth"), ("foot", "feet"),
    ("box", "boxes"), ("city", "cities"), ("leaf", "leaves"), ("knife", "knives"),
    ("woman", "women"), ("sheep", "sheep"), ("bus", "buses"), ("story", "stories"),
]  # fmt: skip
SOUNDS = [
    ("cow", "moo"), ("dog", "woof"), ("cat", "meow"), ("duck", "quack"), ("sheep", "baa"),
    ("owl", "hoot"), ("horse", "neigh"), ("frog", "croak"), ("lion", "roar"), ("bee", "buzz"),
]  # fmt: skip
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
WORDS = [
    "garden", "window", "planet", "river", "pencil", "market", "silver", "orange", "castle",
    "bridge", "forest", "letter", "candle", "summer", "basket", "rocket", "travel", "island",
]  # fmt: skip
NAMES = ["Maria", "Tom", "Aisha", "Kenji", "Lucas", "Priya", "Elena", "Omar", "Grace", "Noah"]
GIFTS = [
    ("the flowers", "They made the whole room brighter."),
    ("the book", "I started reading it last night and could not put it down."),
    ("your help with the move", "I could not have done it without you."),
    ("dinner on Friday", "The soup was wonderful and the company was even better."),
    ("the birthday card", "It made me smile all day."),
    ("looking after my cat", "She clearly enjoyed every minute with you."),
]
UNITS = [
    ("minutes", "hour", 60), ("seconds", "minute", 60), ("hours", "day", 24),
    ("days", "week", 7), ("centimeters", "meter", 100), ("grams", "kilogram", 1000),
    ("months", "year", 12),
]  # fmt: skip


class Picker:
    """Deterministic choices from `random.Random(seed).random()` only (stable across versions)."""

    def __init__(self, seed: int):
        self._rng = random.Random(seed)

    def index(self, n: int) -> int:
        return int(self._rng.random() * n)

    def choice(self, items):
        return items[self.index(len(items))]

    def integer(self, lo: int, hi: int) -> int:
        return lo + self.index(hi - lo + 1)


def _arithmetic(p: Picker) -> tuple[str, str]:
    a, b = p.integer(2, 99), p.integer(2, 99)
    kind = p.index(3)
    if kind == 0:
        return f"What is {a} plus {b}?", f"{a} plus {b} equals {a + b}."
    if kind == 1:
        a, b = max(a, b), min(a, b)
        return f"What is {a} minus {b}?", f"{a} minus {b} equals {a - b}."
    a, b = a % 12 + 2, b % 12 + 2
    return f"What is {a} times {b}?", f"{a} times {b} equals {a * b}."


def _capital(p: Picker) -> tuple[str, str]:
    country, city = p.choice(CAPITALS)
    if p.index(2):
        return f"What is the capital of {country}?", f"The capital of {country} is {city}."
    return f"Which country has {city} as its capital?", f"{city} is the capital of {country}."


def _opposite(p: Picker) -> tuple[str, str]:
    a, b = p.choice(OPPOSITES)
    if p.index(2):
        a, b = b, a
    return f'What is the opposite of "{a}"?', f'The opposite of "{a}" is "{b}".'


def _plural(p: Picker) -> tuple[str, str]:
    one, many = p.choice(PLURALS)
    if one == many:
        answer = f'The plural of "{one}" is also "{many}"; the word does not change.'
    else:
        answer = f'The plural of "{one}" is "{many}".'
    return f'What is the plural of "{one}"?', answer


def _sound(p: Picker) -> tuple[str, str]:
    animal, sound = p.choice(SOUNDS)
    return f"What sound does a {animal} make?", f'A {animal} says "{sound}".'


def _day(p: Picker) -> tuple[str, str]:
    i = p.index(7)
    if p.index(2):
        return (
            f"What day comes after {DAYS[i]}?",
            f"The day after {DAYS[i]} is {DAYS[(i + 1) % 7]}.",
        )
    return (
        f"What day comes before {DAYS[i]}?",
        f"The day before {DAYS[i]} is {DAYS[(i - 1) % 7]}.",
    )


def _spelling(p: Picker) -> tuple[str, str]:
    w = p.choice(WORDS)
    kind = p.index(3)
    if kind == 0:
        return f'Spell the word "{w}" backwards.', f'Backwards, "{w}" is spelled "{w[::-1]}".'
    if kind == 1:
        return f'How many letters are in the word "{w}"?', f'The word "{w}" has {len(w)} letters.'
    return f'What is the first letter of "{w}"?', f'The first letter of "{w}" is "{w[0]}".'


def _sort(p: Picker) -> tuple[str, str]:
    nums = [p.integer(1, 50) for _ in range(p.integer(3, 5))]
    listed = ", ".join(map(str, nums))
    if p.index(2):
        return (
            f"Sort these numbers from smallest to largest: {listed}.",
            f"From smallest to largest: {', '.join(map(str, sorted(nums)))}.",
        )
    return f"Which is the largest of these numbers: {listed}?", f"The largest is {max(nums)}."


def _units(p: Picker) -> tuple[str, str]:
    small, big, factor = p.choice(UNITS)
    n = p.integer(2, 9)
    return (
        f"How many {small} are in {n} {big}s?",
        f"There are {n * factor} {small} in {n} {big}s, because each {big} has {factor}.",
    )


def _note(p: Picker) -> tuple[str, str]:
    name = p.choice(NAMES)
    gift, detail = p.choice(GIFTS)
    return (
        f"Write a short thank-you note to {name} for {gift}.",
        f"Dear {name},\nThank you so much for {gift}. {detail}\nWarm wishes",
    )


def _even(p: Picker) -> tuple[str, str]:
    n = p.integer(1, 200)
    kind = "even" if n % 2 == 0 else "odd"
    return f"Is {n} an even or an odd number?", f"{n} is an {kind} number."


KINDS = [
    _arithmetic, _capital, _opposite, _plural, _sound, _day, _spelling, _sort, _units, _note,
    _even,
]  # fmt: skip


def make_pairs(n: int, seed: int) -> list[dict]:
    """`n` distinct prompt/response pairs, cycling through the kinds of question."""
    p = Picker(seed)
    seen: set[str] = set()
    out: list[dict] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 100 * n:
            raise RuntimeError(f"could not draw {n} distinct prompts")
        prompt, response = KINDS[attempts % len(KINDS)](p)
        if prompt not in seen:
            seen.add(prompt)
            out.append({"prompt": prompt, "response": response})
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--output", default="data/sft_tiny.jsonl", help="JSONL file to write")
    ap.add_argument("--num", type=int, default=200, help="number of pairs")
    ap.add_argument("--seed", type=int, default=0, help="generator seed")
    args = ap.parse_args(argv)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(x, ensure_ascii=False) for x in make_pairs(args.num, args.seed)]
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {len(lines)} pairs to {out}")


if __name__ == "__main__":
    main()
