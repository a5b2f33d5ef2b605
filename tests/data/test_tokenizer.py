"""Tokenizers and chat templates: hand-computed ids and trained masks; sentencepiece, HF folders."""

import json
from pathlib import Path

import pytest

from megarlhf.data.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    TokenizerError,
    load_tokenizer,
)
from tests.data.common import BOS, EOS, CharTokenizer, ords

REPO = Path(__file__).parents[2]


def test_default_template_pair_hand_computed():
    c = CharTokenizer().tokenize_pair("hi", "yo")
    prompt = [BOS] + ords("User: hi\n\n") + ords("Assistant:")
    assert c.ids == prompt + ords(" yo") + [EOS]
    assert c.trained == [False] * len(prompt) + [True] * 4
    # The generation prompt is exactly the untrained prefix.
    assert CharTokenizer().tokenize_pair("hi").ids == prompt


def test_default_template_conversation_trains_assistant_turns_only():
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    c = CharTokenizer(bos=False).tokenize_chat(msgs)
    expected = [
        (ords("System: S\n\n"), False),
        (ords("User: a\n\n"), False),
        (ords("Assistant:"), False),
        (ords(" b") + [EOS], True),
        (ords("User: c\n\n"), False),
        (ords("Assistant:"), False),
        (ords(" d") + [EOS], True),
    ]
    assert c.ids == [i for ids, _ in expected for i in ids]
    assert c.trained == [t for ids, t in expected for _ in ids]


def test_raw_template_is_verbatim():
    c = CharTokenizer().tokenize_pair("Q: x\nA:", " y", template="raw")
    assert c.ids == [BOS] + ords("Q: x\nA:") + ords(" y") + [EOS]
    assert c.trained == [False] * 8 + [True] * 3


def test_messages_with_raw_template_refused():
    with pytest.raises(ValueError, match="cannot format messages"):
        CharTokenizer().tokenize_chat([{"role": "user", "content": "x"}], template="raw")


# ----------------------------------------------------------------------------- sentencepiece


@pytest.fixture(scope="module")
def sp():
    return load_tokenizer(REPO / "data" / "tokenizer")


def test_shipped_sentencepiece_loads_from_folder_and_file(sp):
    assert isinstance(sp, SentencePieceTokenizer)
    assert (sp.pad_id, sp.bos_id, sp.eos_id, sp.vocab_size) == (0, 2, 3, 512)
    by_file = load_tokenizer(REPO / "data" / "tokenizer" / "tokenizer.model")
    assert by_file.encode("What is 2 plus 3?") == sp.encode("What is 2 plus 3?")


def test_sentencepiece_round_trip_and_exact_segments(sp):
    text = "Zürich, naïve café ✓\n\ttabs  and  spaces 12345 \U0001f600"
    assert sp.decode(sp.encode(text)) == text  # byte fallback, no normalization
    c = sp.tokenize_pair("What is 2 plus 3?", "It is 5.")
    assert sp.decode(c.ids) == "User: What is 2 plus 3?\n\nAssistant: It is 5."
    trained = [i for i, t in zip(c.ids, c.trained, strict=True) if t]
    assert trained[-1] == sp.eos_id and sp.decode(trained) == " It is 5."
    prompt = sp.tokenize_pair("What is 2 plus 3?").ids
    assert c.ids[: len(prompt)] == prompt and not any(c.trained[: len(prompt)])


# ----------------------------------------------------------------------------- Hugging Face

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Rewrites earlier turns (drops all but the last assistant turn): not prefix-consistent.
REWRITING = (
    "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
    "[{{ m['role'] }}]{{ m['content'] }}{% endif %}{% endfor %}"
)


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["hello world, the user asks and the assistant answers"] * 4, trainer)
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, eos, template in [
        ("plain", "</s>", None),
        ("chatml", "<|im_end|>", CHATML),
        ("chatml_eos_s", "</s>", CHATML),
        ("rewriting", "</s>", REWRITING),
    ]:
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token=eos, unk_token="<unk>"
        )
        if template:
            fast.chat_template = template
        fast.save_pretrained(root / name)
        out[name] = load_tokenizer(root / name)
    return out


def _trained_text(t, c):
    return t.decode([i for i, f in zip(c.ids, c.trained, strict=True) if f])


def test_hf_folder_own_template_trains_through_eos(hf_folders):
    t = hf_folders["chatml"]
    assert isinstance(t, HFTokenizer) and t.has_chat_template
    assert t.pad_id == t.eos_id  # no pad token: EOS pads
    c = t.tokenize_pair("hello", "world")
    full = "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\nworld<|im_end|>\n"
    assert t.decode(c.ids) == full
    assert _trained_text(t, c) == "world<|im_end|>"  # the newline after the EOS is not trained
    assert c.ids[-1] == t.encode("\n")[0] and not c.trained[-1]
    prompt = t.tokenize_pair("hello").ids
    assert t.decode(prompt) == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert c.ids[: len(prompt)] == prompt


def test_reward_model_completions_end_at_the_eos(hf_folders, tmp_path):
    """The RM loader (and the demonstrations it normalizes on) cut a template's text after the
    assistant's EOS: the score is read where PPO reads it, at the EOS a sampled response ends
    with. Without text after the EOS the completion is the whole rendering."""
    from megarlhf.data.chat import through_last_trained
    from megarlhf.data.rankings import load_ranking_dataset

    row = {"prompt": "hello", "chosen": "world", "rejected": "the user"}
    path = tmp_path / "rm.jsonl"
    path.write_text(json.dumps(row) + "\n")
    for name, tail in (("chatml", "<|im_end|>\n"), ("plain", "</s>")):
        t = hf_folders[name]
        (sample,) = load_ranking_dataset([str(path)], t, 64, "auto", 2).samples
        for ids, response in zip(sample.completions, ("world", "the user"), strict=True):
            full = t.tokenize_pair("hello", response)
            assert t.decode(full.ids).endswith(response + tail)
            assert list(ids) == through_last_trained(full.ids, full.trained)
            assert ids[-1] == t.eos_id and t.decode(list(ids)).endswith(response + tail.strip())
            assert len(ids) == len(full.ids) - (name == "chatml")


def test_hf_template_without_eos_gets_eos_appended(hf_folders):
    t = hf_folders["chatml_eos_s"]
    msgs = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "world"},
        {"role": "user", "content": "the"},
        {"role": "assistant", "content": "answers"},
    ]
    c = t.tokenize_chat(msgs)
    assert _trained_text(t, c) == "world<|im_end|>\n</s>answers<|im_end|>\n</s>"
    assert c.ids.count(t.eos_id) == 2


def test_hf_folder_without_template_uses_default(hf_folders):
    t = hf_folders["plain"]
    assert not t.has_chat_template
    c = t.tokenize_pair("hello", "world")
    assert t.decode(c.ids) == "<s>User: hello\n\nAssistant: world</s>"
    assert _trained_text(t, c) == " world</s>"
    forced = hf_folders["chatml"].tokenize_pair("hello", "world", template="default")
    assert hf_folders["chatml"].decode(forced.ids) == "<s>User: hello\n\nAssistant: world<|im_end|>"


def test_hf_template_not_prefix_consistent_is_refused(hf_folders):
    msgs = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    with pytest.raises(ValueError, match="not prefix-consistent.*data.template=default"):
        hf_folders["rewriting"].tokenize_chat(msgs)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(TokenizerError, match="no tokenizer found"):
        load_tokenizer(tmp_path)
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="not a sentencepiece model"):
        load_tokenizer(junk)
