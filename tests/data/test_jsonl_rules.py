"""The JSON-lines rules every loader shares (SFT, RM, PPO prompts; PTX text for the line rules):
lines split on "\\n" only, a BOM at the start of a file, bad UTF-8 and bad or too deeply nested
JSON reported with file:line, and RM's skip count logged as a total like SFT's."""

import json
import logging
import re

import pytest

from megarlhf.data.prompts import load_prompts, load_ptx_rows
from megarlhf.data.rankings import load_ranking_dataset
from megarlhf.data.sft import DataError, load_sft_dataset
from tests.data.common import BOS, EOS, CharTokenizer, ords


def _sft(path):
    return load_sft_dataset([path], CharTokenizer(), seq_len=256).samples


def _rm(path):
    return load_ranking_dataset([path], CharTokenizer(), seq_len=256).samples


def _ppo(path):
    return load_prompts([path], CharTokenizer(), "auto", 256)


# loader, a good row of its kind
LOADERS = {
    "sft": (_sft, {"prompt": "a", "response": "b"}),
    "rm": (_rm, {"prompt": "a", "chosen": "b", "rejected": "c"}),
    "ppo": (_ppo, {"prompt": "a"}),
}
STAGES = sorted(LOADERS)


def _write(tmp_path, lines: list[bytes], name="x.jsonl") -> str:
    path = tmp_path / name
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def _good(stage: str, **changes) -> bytes:
    return json.dumps({**LOADERS[stage][1], **changes}, ensure_ascii=False).encode()


def _error(stage, path) -> DataError:
    with pytest.raises(DataError) as err:
        LOADERS[stage][0](path)
    return err.value


@pytest.mark.parametrize("stage", STAGES)
def test_invalid_utf8_names_file_and_line(tmp_path, stage):
    path = _write(tmp_path, [_good(stage), b'{"prompt": "\xff"}'])
    err = _error(stage, path)
    assert str(err) == f"{path}:2: not valid UTF-8 (byte 12)" and err.reason == "not_utf8"


@pytest.mark.parametrize("stage", STAGES)
def test_line_separator_inside_a_row_is_not_a_line_break(tmp_path, stage):
    # U+2028 and U+0085 are characters in a JSON string; str.splitlines() would cut the row.
    path = _write(tmp_path, [_good(stage, prompt="a\u2028b\x85c"), _good(stage)])
    rows = LOADERS[stage][0](path)
    assert len(rows) == 2
    first = rows[0]
    ids = {"sft": lambda: first.input_ids, "rm": lambda: first.completions[0]}.get(
        stage, lambda: first
    )()
    ids = list(ids)
    assert ids[: 1 + len("User: a\u2028b\x85c")] == [BOS] + ords("User: a\u2028b\x85c")


@pytest.mark.parametrize("stage", STAGES)
def test_utf8_bom_at_the_start_of_a_file_is_accepted(tmp_path, stage):
    path = _write(tmp_path, [b"\xef\xbb\xbf" + _good(stage), _good(stage)])
    assert len(LOADERS[stage][0](path)) == 2


@pytest.mark.parametrize("stage", STAGES)
def test_malformed_json_message_is_the_same_everywhere(tmp_path, stage):
    path = _write(tmp_path, [_good(stage), b'{"prompt": }'])
    err = _error(stage, path)
    assert str(err) == f"{path}:2: malformed JSON: Expecting value (column 12)"
    assert err.reason == "malformed_json"


@pytest.mark.parametrize("stage", STAGES)
def test_deeply_nested_json_is_a_data_error(tmp_path, stage):
    path = _write(tmp_path, [_good(stage), b"[" * 200_000])
    err = _error(stage, path)
    assert str(err) == f"{path}:2: malformed JSON (nested too deeply)"
    nested = b'{"prompt": "a", "response": ' + b"[" * 200_000 + b"}"
    path = _write(tmp_path, [_good(stage), _good(stage), nested], name="y.jsonl")
    assert str(_error(stage, path)) == f"{path}:3: malformed JSON (nested too deeply)"


def test_ptx_text_lines_split_on_newline_only(tmp_path):
    path = tmp_path / "ptx.txt"
    path.write_bytes(b"\xef\xbb\xbfab\r\n\n" + "c\u2028d\n".encode())
    rows = load_ptx_rows([str(path)], CharTokenizer(), seq_len=7)
    assert rows.tolist() == [ords("ab") + [EOS] + ords("c\u2028d") + [EOS]]


def test_ptx_invalid_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "ptx.txt"
    path.write_bytes(b"fine\n\nbad \xfe here\n")
    with pytest.raises(DataError, match=re.escape(f"{path}:3: not valid UTF-8 (byte 4)")):
        load_ptx_rows([str(path)], CharTokenizer(), seq_len=2)


def test_rm_skip_invalid_logs_a_total_by_reason(tmp_path, caplog):
    lines = [
        _good("rm"),
        b'{"prompt": }',
        _good("rm", chosen="x", rejected="x"),
        _good("rm", rejected="y"),
        _good("rm", chosen="z", rejected="z"),
    ]
    path = _write(tmp_path, lines)
    with caplog.at_level(logging.WARNING, logger="megarlhf.data.rankings"):
        ds = load_ranking_dataset([path], CharTokenizer(), seq_len=64, skip_invalid=True)
    assert [s.source for s in ds.samples] == [f"{path}:1", f"{path}:4"]
    assert ds.skipped == {"malformed_json": 1, "duplicate_response": 2}
    assert ds.first_skipped["duplicate_response"].startswith(f"{path}:3: responses[0] and")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        f"{path}: skipped 1 invalid row(s) (malformed_json), first: {path}:2: malformed JSON: "
        "Expecting value (column 12)",
        f"{path}: skipped 2 invalid row(s) (duplicate_response), first: {path}:3: responses[0] "
        "and responses[1] are identical",
        "RM data: kept 2 samples, skipped 3 invalid rows: duplicate_response=2, malformed_json=1",
    ]
