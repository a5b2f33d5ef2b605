"""Row shapes and storage formats: each fixture of data/fixtures/ against the prompt, messages and
ranking written out by hand, the tokens the three loaders make of them, column mapping, shape
detection and every new bad-input message; the fixtures are what their tool regenerates."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megarlhf.config import ConfigError, from_dict, load_config
from megarlhf.config.data import DataConfig, FieldsConfig, RMDataConfig, RowsConfig
from megarlhf.config.ppo import PPORunConfig
from megarlhf.config.rm import RMRunConfig
from megarlhf.config.sft import SFTRunConfig
from megarlhf.data.formats import Example, parse_row
from megarlhf.data.prompts import load_prompts
from megarlhf.data.rankings import load_ranking_dataset
from megarlhf.data.rows import iter_rows
from megarlhf.data.sft import DataError, load_sft_dataset
from tests.data.common import BOS, EOS, CharTokenizer, ords

REPO = Path(__file__).parents[2]
FIX = REPO / "data" / "fixtures"
F = FieldsConfig()


def _user(text):
    return {"role": "user", "content": text}


def _assistant(text):
    return {"role": "assistant", "content": text}


def _rows(name):
    return [r.value() for r in iter_rows(str(FIX / name))]


def _turn(role, text):
    """Default-template tokens of one turn (assistant: its trained part with EOS)."""
    if role == "assistant":
        return ords("Assistant:") + ords(" " + text) + [EOS]
    return ords(f"{role.capitalize()}: {text}\n\n")


# ----------------------------------------------------------------------------- shapes, by hand


def test_hh_rows_hand_computed():
    rows = _rows("hh_rlhf.jsonl")
    assert parse_row(rows[1], "auto", F, "rm") == Example(
        prompt=(_user("Name a fruit."), _assistant("An apple."), _user("Another one?")),
        responses=("A pear.", "No."),
        ranks=(1, 2),
    )
    # Whitespace around a turn's text is dropped: "Say hi. " and "  Hi there! ".
    assert parse_row(rows[3], "hh", F, "ppo") == Example(
        (_user("Say hi."),), ("Hi there!", "Go away."), (1, 2)
    )


def test_ultrafeedback_rows_hand_computed():
    rows = _rows("ultrafeedback.parquet")
    assert rows[1]["prompt_id"] == "p1" and rows[1]["score_chosen"] == 8.5
    system = {"role": "system", "content": "Answer in one word."}
    assert parse_row(rows[1], "auto", F, "sft") == Example(
        (system, _user("What is 'cat' in French?")), ("Chat.", "Chien."), (1, 2)
    )
    assert parse_row(rows[2], "chosen_rejected_messages", F, "rm") == Example(
        (_user("Pick a colour."), _assistant("Blue."), _user("Why?")),
        ("It is calm.", "Because."),
        (1, 2),
    )


def test_prompt_set_rows_hand_computed():
    rows = _rows("prompts_messages")
    assert parse_row(rows[2], "auto", F, "ppo").prompt == (
        _user("Name a planet."),
        _assistant("Mars."),
        _user("Another."),
    )
    # A final assistant turn is the answer, not part of the prompt.
    assert parse_row(rows[3], "messages", F, "ppo").prompt == (_user("What is 10 minus 4?"),)
    arrow = _rows("prompts.arrow")
    assert arrow[1] == {"prompt": "Spell the word 'river' backwards.", "source": "fixture"}
    assert parse_row(arrow[1], "auto", F, "ppo") == Example("Spell the word 'river' backwards.")


# ----------------------------------------------------------------------------- the loaders' tokens


def test_rm_loads_hh_as_k2_rankings():
    ds = load_ranking_dataset([str(FIX / "hh_rlhf.jsonl")], CharTokenizer(), seq_len=128)
    assert len(ds.samples) == 4
    s = ds.samples[1]
    head = [BOS] + _turn("user", "Name a fruit.") + _turn("assistant", "An apple.")
    head += _turn("user", "Another one?")
    assert s.completions == (
        tuple(head + _turn("assistant", "A pear.")),
        tuple(head + _turn("assistant", "No.")),
    )
    assert s.ranks == (1, 2) and s.source == f"{FIX / 'hh_rlhf.jsonl'}:2"


def test_rm_loads_ultrafeedback_parquet():
    path = str(FIX / "ultrafeedback.parquet")
    ds = load_ranking_dataset([path], CharTokenizer(), seq_len=128)
    s = ds.samples[0]
    head = [BOS] + _turn("user", "What is 2 + 3?")
    assert s.completions == (
        tuple(head + _turn("assistant", "2 + 3 = 5.")),
        tuple(head + _turn("assistant", "2 + 3 = 6.")),
    )
    assert s.source == f"{path} row 0"


def test_sft_loads_hh_chosen_as_demonstration():
    ds = load_sft_dataset([str(FIX / "hh_rlhf.jsonl")], CharTokenizer(), seq_len=128)
    s = ds.samples[1]
    u1, a1 = _turn("user", "Name a fruit."), _turn("assistant", "An apple.")
    u2, a2 = _turn("user", "Another one?"), _turn("assistant", "A pear.")
    assert s.input_ids == tuple([BOS] + u1 + a1 + u2 + a2)
    # Trained: every assistant turn's " text" + EOS, not "Assistant:" nor the user turns.
    mask = [False] * (1 + len(u1) + 10) + [True] * (len(a1) - 10)
    mask += [False] * (len(u2) + 10) + [True] * (len(a2) - 10)
    assert s.loss_mask == tuple(mask)


def test_sft_loads_ultrafeedback_chosen():
    ds = load_sft_dataset([str(FIX / "ultrafeedback.parquet")], CharTokenizer(), seq_len=128)
    system, user = "System: Answer in one word.\n\n", _turn("user", "What is 'cat' in French?")
    assert ds.samples[1].input_ids == tuple(
        [BOS] + ords(system) + user + _turn("assistant", "Chat.")
    )


def test_ppo_prompts_of_every_shape():
    tok = CharTokenizer()
    gen = ords("Assistant:")
    got = load_prompts([str(FIX / "prompts_messages")], tok, "auto", 128)
    sys_turn = ords("System: You are terse.\n\n")
    assert got[1] == [BOS] + sys_turn + _turn("user", "What is the opposite of hot?") + gen
    assert got[3] == [BOS] + _turn("user", "What is 10 minus 4?") + gen
    hh = load_prompts([str(FIX / "hh_rlhf.jsonl")], tok, "auto", 128)
    assert hh[0] == [BOS] + _turn("user", "What is the capital of France?") + gen
    arrow = load_prompts([str(FIX / "prompts.arrow")], tok, "auto", 128)
    assert arrow[2] == [BOS] + _turn("user", "Which is larger, 7 or 12?") + gen
    uf = load_prompts([str(FIX / "ultrafeedback.parquet")], tok, "auto", 128)
    assert uf[0] == [BOS] + _turn("user", "What is 2 + 3?") + gen


def test_column_mapping_reads_a_json_array():
    qa = RowsConfig(fields=FieldsConfig(prompt="question", response="answer"))
    path = str(FIX / "qa.json")
    ds = load_sft_dataset([path], CharTokenizer(), seq_len=128, rows=qa)
    s = ds.samples[1]
    assert s.input_ids == tuple(
        [BOS] + _turn("user", "What is 4 times 3?") + _turn("assistant", "4 times 3 is 12.")
    )
    assert s.source == f"{path} row 1"
    prompts = load_prompts([path], CharTokenizer(), "auto", 128, rows=qa)
    assert prompts[0] == [BOS] + _turn("user", "What colour is the sky?") + ords("Assistant:")
    with pytest.raises(DataError, match=re.escape(f"{path} row 0: missing field 'prompt'")):
        load_sft_dataset([path], CharTokenizer(), seq_len=128)


def test_save_to_disk_dataset_dict_uses_its_train_split(tmp_path):
    import datasets

    rows = [{"q": "a?", "a": "b."}]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(tmp_path / "d")
    fields = RowsConfig(fields=FieldsConfig(prompt="q", response="a"))
    ds = load_sft_dataset([str(tmp_path / "d")], CharTokenizer(), seq_len=64, rows=fields)
    assert [s.source for s in ds.samples] == [f"{tmp_path / 'd' / 'train'} row 0"]
    two = {"dev": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows)}
    datasets.DatasetDict(two).save_to_disk(tmp_path / "two")
    with pytest.raises(DataError, match="holds splits \\['dev', 'test'\\] and none is 'train'"):
        load_sft_dataset([str(tmp_path / "two")], CharTokenizer(), seq_len=64, rows=fields)


def test_columnar_rows_name_file_and_row(tmp_path):
    path = str(FIX / "ultrafeedback.parquet")
    # BOS + "System: Answer in one word.\n\n" (29) + "User: What is 'cat' in French?\n\n" (32)
    # + "Assistant:" (10) + " Chat." (6) + EOS = 79 tokens.
    msg = f"{path} row 1: prompt + responses[0] is 79 tokens, longer than data.seq_len=60"
    with pytest.raises(DataError, match=re.escape(msg)):
        load_ranking_dataset([path], CharTokenizer(), seq_len=60)
    ds = load_ranking_dataset([path], CharTokenizer(), seq_len=60, skip_invalid=True)
    assert ds.skipped == {"too_long": 2} and len(ds.samples) == 1
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(DataError, match=f"{bad}: cannot read data file"):
        load_sft_dataset([str(bad)], CharTokenizer(), seq_len=64)
    with pytest.raises(DataError, match="cannot read data file \\(No such file"):
        load_sft_dataset([str(tmp_path / "missing.parquet")], CharTokenizer(), seq_len=64)


def test_json_array_errors_name_the_line(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('[\n  {"prompt": "a", "response": "b"},\n  {"prompt": }\n]\n')
    with pytest.raises(DataError, match=re.escape(f"{path}:3: malformed JSON: Expecting value")):
        load_sft_dataset([str(path)], CharTokenizer(), seq_len=64, skip_invalid=True)
    path.write_bytes(b'\xef\xbb\xbf[{"prompt": "a", "response": "b"},\n {"prompt": "\xff"}]')
    with pytest.raises(DataError, match=re.escape(f"{path}:2: not valid UTF-8 (byte 13)")):
        load_sft_dataset([str(path)], CharTokenizer(), seq_len=64)
    lines = tmp_path / "lines.json"  # JSON lines in a .json file
    lines.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": "d"}\n')
    ds = load_sft_dataset([str(lines)], CharTokenizer(), seq_len=64)
    assert [s.source for s in ds.samples] == [f"{lines}:1", f"{lines}:2"]


# ----------------------------------------------------------------------------- bad rows


def _hh(*turns):
    return "".join(f"\n\n{r}: {t}" for r, t in zip(["Human", "Assistant"] * 4, turns, strict=False))


BAD = [
    # (stage, format, row, reason, message)
    ("rm", "auto", {"chosen": "Hi", "rejected": "Yo"}, "bad_transcript", "field 'chosen' is not"),
    (
        "rm",
        "auto",
        {"chosen": _hh("a", "b", "c", "d"), "rejected": _hh("a", "x", "c", "d")},
        "prompt_mismatch",
        "fields 'chosen' and 'rejected' differ before their last assistant turn",
    ),
    (
        "sft",
        "hh",
        {"chosen": _hh("a"), "rejected": _hh("a", "b")},
        "no_assistant_turn",
        "field 'chosen' does not end with an assistant turn",
    ),
    ("rm", "auto", {"chosen": _hh("a", "b"), "rejected": _hh("a", "b")}, "duplicate_response", ""),
    ("rm", "hh", {"chosen": _hh("a", "b")}, "missing_field", "pairwise row has no 'rejected'"),
    (
        "rm",
        "auto",
        {"chosen": [_user("a"), _assistant("b")], "rejected": [_user("z"), _assistant("c")]},
        "prompt_mismatch",
        "",
    ),
    (
        "ppo",
        "auto",
        {"chosen": [_user("a")], "rejected": [_user("a"), _assistant("c")]},
        "no_assistant_turn",
        "field 'chosen' does not end",
    ),
    (
        "rm",
        "chosen_rejected_messages",
        {"chosen": "a", "rejected": []},
        "wrong_type",
        "field 'chosen' must be a list, got a string",
    ),
    (
        "sft",
        "auto",
        {"chosen": [{"role": "bot", "content": "x"}], "rejected": []},
        "bad_role",
        r"chosen\[0\].role is 'bot'",
    ),
    ("ppo", "auto", {"messages": [], "prompt": "a"}, "ambiguous_row", "row has both"),
    ("ppo", "auto", {"prompt": " "}, "empty_prompt", "the prompt is empty"),
    ("ppo", "messages", {"messages": [_assistant("a")]}, "empty_prompt", ""),
    ("ppo", "auto", {"question": "a"}, "missing_field", "missing field 'prompt' \\(a prompt row"),
    ("sft", "auto", {"prompt": "p", "responses": ["a", "b"], "ranking": [1, 1]}, "tie", ""),
    ("rm", "auto", {"prompt": "p"}, "missing_field", "missing field 'responses'"),
    ("sft", "prompt_response", {"prompt": "p"}, "missing_field", "missing field 'response'"),
]
LOAD = {
    "sft": lambda p, rows: load_sft_dataset([p], CharTokenizer(), 256, rows=rows),
    "rm": lambda p, rows: load_ranking_dataset([p], CharTokenizer(), 256, rows=rows),
    "ppo": lambda p, rows: load_prompts([p], CharTokenizer(), "auto", 256, rows=rows),
}


@pytest.mark.parametrize("stage,fmt,row,reason,message", BAD, ids=[b[3] for b in BAD])
def test_bad_rows_of_each_shape(tmp_path, stage, fmt, row, reason, message):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError) as err:
        LOAD[stage](str(path), RowsConfig(format=fmt))
    assert err.value.reason == reason and err.value.where == f"{path}:1"
    assert re.match(re.escape(f"{path}:1: ") + message, str(err.value)), str(err.value)


def test_raw_template_refuses_conversations():
    path = str(FIX / "hh_rlhf.jsonl")
    with pytest.raises(DataError, match=":1: data.template=raw supports prompt/response rows"):
        load_ranking_dataset([path], CharTokenizer(), 128, template="raw")
    with pytest.raises(DataError, match=":1: data.template=raw supports prompt/response rows"):
        load_prompts([path], CharTokenizer(), "raw", 128)


# ----------------------------------------------------------------------------- config


def test_format_and_fields_keys_load():
    overrides = ["data.format=hh", "data.fields.chosen=better", "data.fields.rejected=worse"]
    cfg = load_config(RMRunConfig, REPO / "configs" / "rm_tiny.yaml", overrides)
    assert cfg.data.rows.format == "hh" and cfg.data.rows.fields.chosen == "better"
    assert cfg.data.rows.fields.prompt == "prompt"
    sft = load_config(SFTRunConfig, REPO / "configs" / "sft_tiny.yaml", ["data.fields.prompt=q"])
    assert sft.data.rows.fields.prompt == "q" and sft.data.rows.format == "auto"
    ppo = load_config(PPORunConfig, REPO / "configs" / "ppo_tiny.yaml", ["data.format=messages"])
    assert ppo.data.rows.format == "messages"


def test_format_and_fields_validation_names_the_key():
    with pytest.raises(ConfigError, match="data.format: 'csv' is not one of auto|"):
        from_dict(DataConfig, {"format": "csv"}, prefix="data.")
    with pytest.raises(ConfigError, match="data.format: 'messages' has no responses to rank"):
        from_dict(RMDataConfig, {"format": "messages"}, prefix="data.")
    with pytest.raises(ConfigError, match="data.fields.response: column 'text' is already data."):
        from_dict(DataConfig, {"fields": {"prompt": "text", "response": "text"}}, prefix="data.")
    with pytest.raises(ConfigError, match="unknown config key\\(s\\): data.fields.question"):
        from_dict(DataConfig, {"fields": {"question": "q"}}, prefix="data.")


# ----------------------------------------------------------------------------- reproducible


def test_fixtures_are_what_their_tool_writes(tmp_path):
    tool = REPO / "tools" / "make_data_fixtures.py"
    subprocess.run([sys.executable, str(tool), "--output", str(tmp_path)], check=True, cwd=REPO)
    shipped = sorted(p.relative_to(FIX) for p in FIX.rglob("*") if p.is_file())
    assert shipped == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    for rel in shipped:
        assert (tmp_path / rel).read_bytes() == (FIX / rel).read_bytes(), rel
