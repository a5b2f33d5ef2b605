"""SFT rows: hand-computed loss masks, every bad-input message, counted skips, the shipped data."""

import json
import logging
import re
from pathlib import Path

import pytest

from megarlhf.config import ConfigError, from_dict
from megarlhf.config.data import DataConfig
from megarlhf.data.sft import DataError, load_sft_dataset, load_sft_file
from megarlhf.data.tokenizer import load_tokenizer
from tests.data.common import BOS, EOS, CharTokenizer, ords

REPO = Path(__file__).parents[2]
GOOD = [{"prompt": "p", "response": "r"}, {"messages": [{"role": "assistant", "content": "x"}]}]


def _write(tmp_path, lines, name="x.jsonl") -> str:
    path = tmp_path / name
    path.write_bytes(b"\n".join(ln if isinstance(ln, bytes) else ln.encode() for ln in lines))
    return str(path)


def test_pair_and_messages_masks_hand_computed(tmp_path):
    path = _write(tmp_path, [json.dumps(r) for r in GOOD])
    a, b = load_sft_file(path, CharTokenizer(), seq_len=64).samples
    head = [BOS] + ords("User: p\n\nAssistant:")
    assert a.input_ids == tuple(head + ords(" r") + [EOS])
    assert a.loss_mask == (False,) * len(head) + (True,) * 3
    assert a.source == f"{path}:1"
    assert b.input_ids == tuple([BOS] + ords("Assistant:") + ords(" x") + [EOS])
    assert b.loss_mask == (False,) * 11 + (True,) * 3


U = '{"messages": [{"role": "user", "content": "x"}]}'
A = '{"messages": [{"role": "assistant", "content": ""}]}'
LONG = '{"prompt": "a", "response": "' + "y" * 60 + '"}'
# (line, reason, message regex); BOS + "User: a\n\n" + "Assistant:" + " " + 60 y + EOS = 82 tokens.
BAD = [
    (
        '{"prompt": "a", "response": }',
        "malformed_json",
        r"malformed JSON: Expecting value \(column 29\)",
    ),
    ("[1, 2]", "wrong_type", "row must be an object, got a list"),
    ('{"prompt": "a"}', "missing_field", "missing field 'response'"),
    ('{"response": "a"}', "missing_field", "missing field 'prompt'"),
    (
        '{"prompt": 3, "response": "b"}',
        "wrong_type",
        "field 'prompt' must be a string, got a number",
    ),
    (
        '{"prompt": "a", "response": null}',
        "wrong_type",
        "field 'response' must be a string, got null",
    ),
    ('{"prompt": "a", "response": "  "}', "empty_response", "field 'response' is empty"),
    (LONG, "too_long", "sample is 82 tokens, longer than data.seq_len=64"),
    ('{"messages": "hi"}', "wrong_type", "field 'messages' must be a list, got a string"),
    ('{"messages": [{"role": "user"}]}', "missing_field", r"messages\[0\] has no 'content'"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "bad_role", r"messages\[0\].role is 'bot'"),
    (U, "no_assistant_turn", "conversation has no assistant turn to train on"),
    (A, "empty_response", r"messages\[0\] \(assistant\) has empty content"),
    ('{"messages": [], "prompt": "a"}', "ambiguous_row", "row has both 'messages' and 'prompt'"),
    (b'{"prompt": "\xff", "response": "b"}', "not_utf8", r"not valid UTF-8 \(byte 12\)"),
]


@pytest.mark.parametrize("line,reason,message", BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_each_bad_row_names_file_and_line(tmp_path, line, reason, message):
    # Line 3 (a blank line counts as a line) holds the bad row.
    path = _write(tmp_path, [json.dumps(GOOD[0]), "", line, json.dumps(GOOD[1])])
    with pytest.raises(DataError) as err:
        load_sft_file(path, CharTokenizer(), seq_len=64)
    assert re.fullmatch(re.escape(f"{path}:3: ") + message + ".*", str(err.value))
    assert err.value.reason == reason and err.value.where == f"{path}:3"


def test_raw_template_rejects_messages_rows(tmp_path):
    path = _write(tmp_path, [json.dumps(GOOD[1])])
    with pytest.raises(DataError, match=r":1: data.template=raw supports prompt/response rows"):
        load_sft_file(path, CharTokenizer(), seq_len=64, template="raw")


def test_skip_invalid_counts_and_logs_every_reason(tmp_path, caplog):
    lines = [json.dumps(GOOD[0])] + [b[0] for b in BAD] + [json.dumps(GOOD[1])]
    path = _write(tmp_path, lines)
    with caplog.at_level(logging.WARNING, logger="megarlhf.data.sft"):
        ds = load_sft_dataset([path], CharTokenizer(), seq_len=64, skip_invalid=True)
    assert [s.source for s in ds.samples] == [f"{path}:1", f"{path}:{len(lines)}"]
    expected: dict[str, int] = {}
    for _, reason, _ in BAD:
        expected[reason] = expected.get(reason, 0) + 1
    assert ds.skipped == expected
    assert ds.first_skipped["too_long"].startswith(f"{path}:9: sample is 82 tokens")
    log = caplog.text
    assert f"{path}: skipped 4 invalid row(s) (wrong_type), first: {path}:3:" in log
    assert f"kept 2 samples, skipped {len(BAD)} invalid rows" in log


def test_no_usable_rows_is_an_error(tmp_path):
    path = _write(tmp_path, ['{"prompt": "a"}', ""])
    with pytest.raises(DataError, match=r"no usable samples \(1 invalid rows skipped\)"):
        load_sft_dataset([path], CharTokenizer(), seq_len=64, skip_invalid=True)
    with pytest.raises(DataError, match="cannot read data file"):
        load_sft_dataset([str(tmp_path / "missing.jsonl")], CharTokenizer(), seq_len=64)


def test_utf8_bom_is_accepted(tmp_path):
    path = _write(tmp_path, [b"\xef\xbb\xbf" + json.dumps(GOOD[0]).encode()])
    assert len(load_sft_file(path, CharTokenizer(), seq_len=64).samples) == 1


def test_data_config_validation_names_the_key():
    def build(**kw):
        return from_dict(DataConfig, kw, prefix="data.")

    with pytest.raises(ConfigError, match="data.template: 'chatml' is not one of auto|default|raw"):
        build(template="chatml")
    with pytest.raises(ConfigError, match="data.seq_len: must be >= 2"):
        build(seq_len=1)
    with pytest.raises(ConfigError, match="data.train_files: need at least one path"):
        build(train_files=[])
    with pytest.raises(ConfigError, match=r"^seq_len: must be >= 2"):
        DataConfig(seq_len=1)  # built directly: the key relative to the section


def test_shipped_demo_data_is_valid_and_masks_responses():
    cfg = DataConfig()
    tok = load_tokenizer(REPO / cfg.text.tokenizer)
    ds = load_sft_dataset([str(REPO / f) for f in cfg.train_files], tok, cfg.seq_len)
    assert len(ds.samples) == 200 and not ds.skipped
    rows = [json.loads(x) for x in (REPO / "data" / "sft_tiny.jsonl").read_text().splitlines()]
    for s, row in zip(ds.samples, rows, strict=True):
        trained = [i for i, m in zip(s.input_ids, s.loss_mask, strict=True) if m]
        assert trained[-1] == tok.eos_id and tok.decode(trained) == " " + row["response"]
        assert tok.decode(s.input_ids) == f"User: {row['prompt']}\n\nAssistant: {row['response']}"
