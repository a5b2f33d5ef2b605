"""Writes the small data fixtures of `data/fixtures/`: a few rows in each public dataset shape the
loaders read, in each storage format (docs/data.md describes the shapes).

    hh_rlhf.jsonl        Anthropic HH-RLHF: {"chosen", "rejected"} whole transcripts
    ultrafeedback.parquet  UltraFeedback-binarized: prompt, chosen / rejected / messages (lists of
                         {"role", "content"}), prompt_id, score_chosen, score_rejected
    prompts_messages/    a datasets save_to_disk folder of a `messages` prompt set
    prompts.arrow        an Arrow stream file of a `prompt` column (plus an unused `source`)
    qa.json              a JSON array of {"id", "question", "answer"} (for data.fields.*)

The rows are written here by hand (not taken from the public sets). Parquet, Arrow and the folder
are written by the pinned pyarrow and datasets, so the same versions give the same bytes:

    python tools/make_data_fixtures.py --output data/fixtures
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _hh(human_assistant: list[str]) -> str:
    """An HH transcript of alternating Human / Assistant turns."""
    roles = ["Human", "Assistant"]
    return "".join(f"\n\n{roles[i % 2]}: {text}" for i, text in enumerate(human_assistant))


HH_ROWS = [
    {
        "chosen": _hh(["What is the capital of France?", "The capital of France is Paris."]),
        "rejected": _hh(["What is the capital of France?", "I don't know."]),
    },
    {
        "chosen": _hh(["Name a fruit.", "An apple.", "Another one?", "A pear."]),
        "rejected": _hh(["Name a fruit.", "An apple.", "Another one?", "No."]),
    },
    {
        "chosen": _hh(["How many legs does a spider have?", "A spider has eight legs."]),
        "rejected": _hh(["How many legs does a spider have?", "Six, like an ant."]),
    },
    # Whitespace around a turn's text is not part of it.
    {
        "chosen": "\n\nHuman: Say hi. \n\nAssistant:  Hi there! ",
        "rejected": "\n\nHuman: Say hi.\n\nAssistant: Go away.",
    },
]


def _chat(*turns: tuple[str, str]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in turns]


def _uf(prompt_id: str, prompt: list, chosen: str, rejected: str, scores: tuple) -> dict:
    """An UltraFeedback-binarized row: the prompt's user text, both conversations, scores."""
    chosen_msgs = prompt + _chat(("assistant", chosen))
    return {
        "prompt": [m for m in prompt if m["role"] == "user"][-1]["content"],
        "prompt_id": prompt_id,
        "chosen": chosen_msgs,
        "rejected": prompt + _chat(("assistant", rejected)),
        "messages": chosen_msgs,
        "score_chosen": scores[0],
        "score_rejected": scores[1],
    }


UF_ROWS = [
    _uf("p0", _chat(("user", "What is 2 + 3?")), "2 + 3 = 5.", "2 + 3 = 6.", (9.0, 2.0)),
    _uf(
        "p1",
        _chat(("system", "Answer in one word."), ("user", "What is 'cat' in French?")),
        "Chat.",
        "Chien.",
        (8.5, 3.0),
    ),
    _uf(
        "p2",
        _chat(("user", "Pick a colour."), ("assistant", "Blue."), ("user", "Why?")),
        "It is calm.",
        "Because.",
        (7.0, 4.5),
    ),
]

PROMPT_MESSAGES = [
    {"messages": _chat(("user", "Write a haiku about rain."))},
    {"messages": _chat(("system", "You are terse."), ("user", "What is the opposite of hot?"))},
    {"messages": _chat(("user", "Name a planet."), ("assistant", "Mars."), ("user", "Another."))},
    # A final assistant turn is the answer, not part of the prompt.
    {"messages": _chat(("user", "What is 10 minus 4?"), ("assistant", "6."))},
]

PROMPTS = [
    {"prompt": "What do bees make?", "source": "fixture"},
    {"prompt": "Spell the word 'river' backwards.", "source": "fixture"},
    {"prompt": "Which is larger, 7 or 12?", "source": "fixture"},
]

QA = [
    {"id": 1, "question": "What colour is the sky?", "answer": "The sky is blue."},
    {"id": 2, "question": "What is 4 times 3?", "answer": "4 times 3 is 12."},
    {"id": 3, "question": "Where do fish live?", "answer": "Fish live in water."},
]


def write_fixtures(out: Path) -> None:
    """Write every fixture into folder `out` (created if needed)."""
    import datasets
    import pyarrow as pa

    datasets.disable_progress_bars()
    out.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(row) + "\n" for row in HH_ROWS)
    (out / "hh_rlhf.jsonl").write_text(lines, encoding="utf-8")
    (out / "qa.json").write_text(json.dumps(QA, indent=2) + "\n", encoding="utf-8")
    datasets.Dataset.from_list(UF_ROWS).to_parquet(str(out / "ultrafeedback.parquet"))
    datasets.Dataset.from_list(PROMPT_MESSAGES).save_to_disk(str(out / "prompts_messages"))
    table = pa.Table.from_pylist(PROMPTS)
    with pa.OSFile(str(out / "prompts.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--output", default="data/fixtures", help="folder to write the fixtures into")
    write_fixtures(Path(ap.parse_args(argv).output))


if __name__ == "__main__":
    main()
