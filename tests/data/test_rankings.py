"""Reward-model ranking data: formats, collation, and each bad-input message."""

import json
from pathlib import Path

import pytest

from megarlhf.data.rankings import collate_rankings, load_ranking_dataset
from megarlhf.data.sft import DataError
from megarlhf.data.tokenizer import load_tokenizer

TOKENIZER = Path(__file__).parents[2] / "data" / "tokenizer"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TOKENIZER)


def _write(tmp_path, rows):
    path = tmp_path / "rm.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_kway_and_pairwise_rows_collate(tok, tmp_path):
    path = _write(
        tmp_path,
        [
            {
                "prompt": "Pick a fruit.",
                "responses": ["Apple.", "Pear.", "Plum."],
                "ranking": [2, 1, 3],
            },
            {"prompt": "Say hi.", "chosen": "Hi there!", "rejected": "No."},
        ],
    )
    ds = load_ranking_dataset([path], tok, seq_len=64)
    assert [len(s.completions) for s in ds.samples] == [3, 2]
    assert ds.samples[1].ranks == (1, 2)
    batch = collate_rankings(ds.samples, tok.pad_id)
    assert batch["input_ids"].shape[0] == 5 and batch["group_sizes"].tolist() == [3, 2]
    assert batch["ranks"].tolist() == [2, 1, 3, 1, 2]
    expect = tok.tokenize_pair("Pick a fruit.", "Pear.").ids
    assert batch["input_ids"][1, : len(expect)].tolist() == expect
    assert batch["attention_mask"][1].sum() == len(expect)
    assert expect[-1] == tok.eos_id  # scored at the EOS that ends the response


def _k(responses, ranking):
    return {"prompt": "p", "responses": responses, "ranking": ranking}


BAD = [
    (_k(["a"], [1]), "needs at least 2 responses"),
    (_k(["a", "b", "c"], [1, 2, 2]), "tied at rank 2"),
    (_k(["a", "b", "c"], [1, 2, 5]), "not a permutation of 1..3"),
    (_k(["a", "b", "a"], [1, 2, 3]), "responses\\[0\\] and responses\\[2\\] are identical"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "are identical"),
    (_k(["a", "b"], [1]), "ranking has 1 entries for 2"),
    (_k(["a", " "], [1, 2]), "responses\\[1\\] is empty"),
    ({"prompt": "p", "responses": ["a", "b"]}, "missing field 'ranking'"),
    ({"prompt": "p", "chosen": "a"}, "pairwise row has no 'rejected'"),
    (_k([str(i) for i in range(10)], list(range(1, 11))), "exceed data.max_k=9"),
    (_k(["a", "b"], ["1", "2"]), "list of integers"),
    ('{"prompt": "p", "responses": [', "malformed JSON"),
    (_k(["a " * 200, "b"], [1, 2]), "longer than data.seq_len=64"),
]


@pytest.mark.parametrize("row,message", BAD, ids=[m[:24] for _, m in BAD])
def test_bad_rows_name_file_and_line(tok, tmp_path, row, message):
    good = {"prompt": "ok", "chosen": "yes", "rejected": "no"}
    path = _write(tmp_path, [good, row])
    with pytest.raises(DataError, match=f"{path}:2: .*{message}"):
        load_ranking_dataset([path], tok, seq_len=64)
    ds = load_ranking_dataset([path], tok, seq_len=64, skip_invalid=True)
    assert len(ds.samples) == 1 and sum(ds.skipped.values()) == 1
