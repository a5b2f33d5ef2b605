"""Reward models in and out of Hugging Face: random-init GPT-2, LLaMA and Mistral
`*ForSequenceClassification` (num_labels=1) converted to our scalar head.

- Scores equal transformers' on right- and left-padded batches (fp32, 1e-5 relative) at TP=1 in
  this process and at TP=2 and PP=2 on two spawned gloo ranks. transformers counts positions
  0..s-1 whatever the mask, so left-padded rows get mask-counted position ids (as its `generate`
  does); it scores the last token that is not `pad_token_id`, ours the last position of the mask,
  which agree while a row's last real token is not the pad id (pinned below where it is).
- Export is bitwise (HF -> megarlhf at every layout -> HF) and loads in transformers.
- The head's bias, which HF's score layer lacks: 0 on import; a non-zero bias is refused on
  export unless folded (gpt2: same scores) or dropped (scores shift by the bias, which config.json
  keeps and import restores bit for bit).
"""

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from megarlhf.algos.ranking import last_token_scores
from megarlhf.checkpoint.model_shards import (
    ModelShardsReader,
    load_model_shard,
    read_meta,
    save_model_shard,
)
from megarlhf.convert import (
    SCORE_BIAS_KEY,
    ConversionError,
    hf_config_to_model_config,
    hf_to_megarlhf,
    megarlhf_to_hf,
    model_config_to_hf_config,
)
from megarlhf.model.gpt import GPTModel
from megarlhf.parallel.state import single_process_state
from tests.convert._ranks import scores_at_layouts
from tests.convert.conftest import REWARD_MODELS, RM_FIRST_TOKEN, RM_LAYOUTS, RM_PAD, VOCAB
from tests.dist import run_ranks

RTOL = 1e-5  # fp32
SEQ = 12
# A full row, a one-token row and two in between.
LENGTHS = [12, 5, 9, 1]
NAMES = list(REWARD_MODELS)
SIDES = ("right", "left")


def padded_batch(side: str, lengths=LENGTHS, seq=SEQ, seed=1):
    """(ids [b, s], mask [b, s]): real tokens from [RM_FIRST_TOKEN, VOCAB), RM_PAD elsewhere."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(RM_FIRST_TOKEN, VOCAB, (len(lengths), seq), generator=g)
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    for i, n in enumerate(lengths):
        if side == "right":
            mask[i, :n] = 1
        else:
            mask[i, seq - n :] = 1
    return ids.masked_fill(mask == 0, RM_PAD), mask


BATCHES = {side: padded_batch(side) for side in SIDES}


def hf_scores(path, ids, mask) -> torch.Tensor:
    """transformers' [b, num_labels] scores, positions counted over the mask."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(ids, attention_mask=mask, position_ids=positions).logits


def our_model(ckpt) -> GPTModel:
    """The whole model of `ckpt` in this process (TP=1, PP=1)."""
    model = GPTModel(read_meta(ckpt).model, single_process_state(), skip_init=True)
    model.load_state_dict(load_model_shard(ckpt, tp=1, tp_rank=0, pp=1, pp_rank=0), strict=True)
    return model.eval()


def our_scores(ckpt, ids, mask) -> torch.Tensor:
    with torch.no_grad():
        return last_token_scores(our_model(ckpt)(ids, attention_mask=mask), mask)


def assert_scores_close(ours, ref):
    assert ours.shape == ref.shape == (len(LENGTHS), 1)
    scale = ref.abs().max().item()
    assert scale > 0.1 and ref.std() > 0.01  # scores that are all ~equal would prove nothing
    torch.testing.assert_close(ours, ref, rtol=RTOL, atol=RTOL * scale)


@pytest.fixture(scope="module")
def reference(hf_rms):
    """(name, side) -> transformers' scores."""
    return {
        (name, side): hf_scores(hf_rms[name], *BATCHES[side]) for name in NAMES for side in SIDES
    }


@pytest.fixture(scope="module")
def ranks(converted_rms):
    layouts = [layout for layout in RM_LAYOUTS if layout != (1, 1)]
    results = run_ranks(scores_at_layouts, 2, converted_rms, layouts, BATCHES, timeout=300)
    return {k: v for r in results for k, v in r.items()}


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("name", NAMES)
def test_scores_match_transformers_tp1(name, side, converted_rms, reference):
    ours = our_scores(converted_rms[name][(1, 1)], *BATCHES[side])
    assert_scores_close(ours, reference[(name, side)])


@pytest.mark.parametrize("layout", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("name", NAMES)
def test_scores_match_transformers_two_ranks(name, side, layout, ranks, reference):
    assert_scores_close(ranks[(name, *layout, side)], reference[(name, side)])


def test_right_padding_needs_no_position_ids(hf_rms, converted_rms):
    """With right padding transformers' default positions are ours: no position ids needed."""
    from transformers import AutoModelForSequenceClassification

    ids, mask = BATCHES["right"]
    for name in NAMES:
        model = AutoModelForSequenceClassification.from_pretrained(hf_rms[name]).eval()
        with torch.no_grad():
            ref = model(ids, attention_mask=mask).logits
        assert_scores_close(our_scores(converted_rms[name][(1, 1)], ids, mask), ref)


@pytest.mark.parametrize("name", NAMES)
def test_import_makes_a_scalar_head_with_zero_bias(name, converted_rms):
    ckpt = converted_rms[name][(2, 1)]
    cfg = read_meta(ckpt).model
    assert (cfg.head, cfg.num_head_outputs) == ("scalar", 1)
    with ModelShardsReader(ckpt) as r:
        assert torch.equal(r.full_tensor("head.bias"), torch.zeros(1))
        assert r.full_tensor("head.weight").shape == (1, cfg.hidden_size)
        assert "output.weight" not in r.names()


def _hf_state(path):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
    return model.state_dict()


def _assert_same_tensors(a: dict, b: dict, what: str):
    assert a.keys() == b.keys(), f"{what}: names differ: {sorted(a.keys() ^ b.keys())[:5]}"
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{what}: {k} differs"


@pytest.mark.parametrize("name", NAMES)
def test_export_is_bitwise_and_loads_in_transformers(name, hf_rms, converted_rms, tmp_path):
    original_file = load_file(hf_rms[name] / "model.safetensors")
    original_model = _hf_state(hf_rms[name])
    original = json.loads((hf_rms[name] / "config.json").read_text())
    for tp, pp in RM_LAYOUTS:
        out = tmp_path / f"hf_tp{tp}pp{pp}"
        megarlhf_to_hf(converted_rms[name][(tp, pp)], out)
        _assert_same_tensors(load_file(out / "model.safetensors"), original_file, str(out))
        _assert_same_tensors(_hf_state(out), original_model, f"transformers from {out}")
        exported = json.loads((out / "config.json").read_text())
        for key in ("model_type", "architectures", "id2label", "label2id", "pad_token_id"):
            assert exported[key] == original[key], key
        assert SCORE_BIAS_KEY not in exported


def test_transformers_skips_trailing_pad_ids_ours_reads_the_mask(hf_rms, converted_rms):
    """Where the conventions differ: a row whose last real token is the pad id (e.g. pad == eos
    and the row ends in EOS). transformers scores the last token that is not the pad id, ours the
    last position of the mask."""
    ids, mask = padded_batch("right", lengths=[6, 8], seed=2)
    ids[0, 5] = RM_PAD  # real token, masked in, equal to the pad id
    for name in NAMES:
        ref = hf_scores(hf_rms[name], ids, mask)
        with torch.no_grad():
            per_token = our_model(converted_rms[name][(1, 1)])(ids, attention_mask=mask)
        scale = ref.abs().max().item()
        close = dict(rtol=RTOL, atol=RTOL * scale)
        torch.testing.assert_close(ref[0], per_token[0, 4], **close)  # HF: one token early
        torch.testing.assert_close(ref[1], per_token[1, 7], **close)
        assert not torch.allclose(last_token_scores(per_token, mask)[0], ref[0], **close)


# ----------------------------------------------------------------------------- the head's bias

BIAS = -0.3137  # not a round number: its fp32 value must survive config.json exactly


def _with_bias(src, dst, value: float):
    """A copy of TP1 checkpoint `src` whose head.bias is `value` (hf_config.json kept)."""
    cfg = read_meta(src).model
    state = load_model_shard(src, tp=1, tp_rank=0, pp=1, pp_rank=0)
    state["head.bias"] = torch.full((1,), value)
    save_model_shard(dst, state, cfg, tp=1, tp_rank=0, pp=1, pp_rank=0)
    shutil.copy2(src / "model" / "hf_config.json", dst / "model" / "hf_config.json")
    return dst


@pytest.mark.parametrize("name", NAMES)
def test_nonzero_bias_is_refused_naming_it(name, converted_rms, tmp_path):
    ckpt = _with_bias(converted_rms[name][(1, 1)], tmp_path / "biased", BIAS)
    with pytest.raises(ConversionError, match=r"head\.bias = \[-0\.3137\] is not zero.*fold.*drop"):
        megarlhf_to_hf(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", NAMES)
def test_dropped_bias_shifts_scores_and_comes_back_on_import(name, converted_rms, tmp_path):
    ckpt = _with_bias(converted_rms[name][(1, 1)], tmp_path / "biased", BIAS)
    out = tmp_path / "hf"
    megarlhf_to_hf(ckpt, out, score_bias="drop")
    stored = torch.tensor(BIAS, dtype=torch.float32).item()
    assert json.loads((out / "config.json").read_text())[SCORE_BIAS_KEY] == [stored]
    for side in SIDES:
        ours = our_scores(ckpt, *BATCHES[side])
        assert_scores_close(ours - stored, hf_scores(out, *BATCHES[side]))
    hf_to_megarlhf(out, tmp_path / "back", tp=2)
    with ModelShardsReader(ckpt) as a, ModelShardsReader(tmp_path / "back") as b:
        _assert_same_tensors(
            {n: a.full_tensor(n) for n in a.names()},
            {n: b.full_tensor(n) for n in b.names()},
            "back",
        )


def test_folded_bias_gives_transformers_our_scores(converted_rms, tmp_path):
    ckpt = _with_bias(converted_rms["gpt2_rm"][(1, 1)], tmp_path / "biased", BIAS)
    out = tmp_path / "hf"
    megarlhf_to_hf(ckpt, out, score_bias="fold")
    assert SCORE_BIAS_KEY not in json.loads((out / "config.json").read_text())
    for side in SIDES:
        assert_scores_close(our_scores(ckpt, *BATCHES[side]), hf_scores(out, *BATCHES[side]))
    # Against the bias-free export of the same weights, only ln_f.bias changed.
    plain = tmp_path / "plain"
    megarlhf_to_hf(converted_rms["gpt2_rm"][(1, 1)], plain)
    folded, reference = load_file(out / "model.safetensors"), load_file(plain / "model.safetensors")
    changed = sorted(k for k in reference if not torch.equal(reference[k], folded[k]))
    assert changed == ["transformer.ln_f.bias"]


@pytest.mark.parametrize("name", ["llama_rm", "mistral_rm"])
def test_bias_cannot_be_folded_without_a_norm_bias(name, converted_rms, tmp_path):
    ckpt = _with_bias(converted_rms[name][(1, 1)], tmp_path / "biased", BIAS)
    with pytest.raises(ConversionError, match=r"cannot be folded into a llama model.*drop"):
        megarlhf_to_hf(ckpt, tmp_path / "out", score_bias="fold")


def test_sequence_classification_configs_map_to_the_scalar_head():
    hf = {
        "model_type": "mistral",
        "architectures": ["MistralForSequenceClassification"],
        "vocab_size": 300,
        "hidden_size": 48,
        "num_hidden_layers": 3,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "intermediate_size": 80,
        "max_position_embeddings": 64,
        "id2label": {"0": "helpful", "1": "harmless"},
        "label2id": {"helpful": 0, "harmless": 1},
    }
    cfg = hf_config_to_model_config(hf)
    assert (cfg.head, cfg.num_head_outputs, cfg.family) == ("scalar", 2, "llama")
    back = model_config_to_hf_config(cfg, hf)
    assert back["architectures"] == ["MistralForSequenceClassification"]
    assert back["id2label"] == hf["id2label"]  # the base's label names kept when they fit
    one = model_config_to_hf_config(dataclasses.replace(cfg, num_head_outputs=1), hf)
    assert (one["id2label"], one["label2id"]) == ({"0": "LABEL_0"}, {"LABEL_0": 0})
    from transformers import AutoConfig

    read = AutoConfig.for_model("mistral", **{k: v for k, v in back.items() if k != "model_type"})
    assert read.num_labels == 2 and read.architectures == ["MistralForSequenceClassification"]
    lm = model_config_to_hf_config(dataclasses.replace(cfg, head="lm"))
    assert lm["architectures"] == ["LlamaForCausalLM"] and "id2label" not in lm
    assert hf_config_to_model_config({**hf, "architectures": ["MistralForCausalLM"]}).head == "lm"
