"""DPO pieces that need no process group: config validation, preference batches (which positions
the head scores), the loader's reference column and its state, and the trainer's loss function
on a real model against a direct full-vocabulary computation with an fp64 pair loop."""

from __future__ import annotations

import math
import re

import pytest
import torch

from megarlhf.config import ConfigError, load_config
from megarlhf.config.dpo import DPORunConfig, PreferenceLossConfig
from megarlhf.data.formats import prompt_tokens
from megarlhf.data.ranking_loader import (
    PreferenceLoader,
    PreferenceSample,
    collate_preferences,
    load_preference_dataset,
    preference_batches,
)
from megarlhf.data.sampler import ResumableSampler
from megarlhf.data.tokenizer import load_tokenizer
from megarlhf.model.gpt import GPTModel
from megarlhf.parallel.state import single_process_state
from megarlhf.trainers.dpo import make_dpo_loss_fn, make_logps_fn, summarize
from tests.model.common import rel_err, tiny_config
from tests.trainers.common import ROOT

DPO_TINY = str(ROOT / "configs" / "dpo_tiny.yaml")
TOKENIZER = ROOT / "data" / "tokenizer"


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.head=scalar", "model.head: DPO trains a language model, needs model.head=lm"),
        ("dpo.loss=kto", "dpo.loss: 'kto' is not one of dpo|ipo"),
        ("dpo.beta=0", "dpo.beta: must be > 0"),
        ("dpo.label_smoothing=0.5", "dpo.label_smoothing: must be in [0, 0.5)"),
        ("dpo.micro_batch_size=0", "dpo.micro_batch_size: must be >= 1"),
        ("data.max_k=1", "data.max_k: must be in [2, 64]"),
        ("dpo.global_batch_size=10", "dpo.global_batch_size: 10 prompts is not a multiple"),
        ("dpo.refrence=x", "unknown config key(s): dpo.refrence"),
    ],
)
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        cfg = load_config(DPORunConfig, DPO_TINY, [override])
        cfg.resolved_passes(1)


def test_label_smoothing_is_for_dpo_only():
    assert PreferenceLossConfig(loss="dpo", label_smoothing=0.1).label_smoothing == 0.1
    with pytest.raises(ConfigError, match="applies to dpo.loss=dpo only"):
        load_config(DPORunConfig, DPO_TINY, ["dpo.loss=ipo", "dpo.label_smoothing=0.1"])


@pytest.fixture(scope="module")
def data():
    tok = load_tokenizer(TOKENIZER)
    return tok, load_preference_dataset([str(ROOT / "data" / "rm_tiny.jsonl")], tok, 128)


def test_preference_samples_know_where_the_response_starts(data):
    import json

    tok, ds = data
    assert len(ds.samples) == 320 and sum(len(s.completions) for s in ds.samples) == 1765
    rows = [json.loads(line) for line in (ROOT / "data" / "rm_tiny.jsonl").read_text().splitlines()]
    for s, row in zip(ds.samples[:20], rows, strict=False):
        prompt = prompt_tokens(tok, row["prompt"], "auto").ids
        assert s.response_start == len(prompt)
        assert all(list(c[: len(prompt)]) == prompt for c in s.completions)


def test_collate_scores_exactly_the_response_tokens(data):
    _, ds = data
    samples = [ds.samples[i] for i in (3, 0, 7)]
    firsts = [100, 10, 50]
    mb = collate_preferences(samples, 0, firsts)
    ids, width = mb["input_ids"], mb["input_ids"].shape[1]
    rows = [c for s in samples for c in s.completions]
    # Each scored position predicts the next token, which is the label.
    torch.testing.assert_close(ids.flatten()[mb["output_index"] + 1], mb["labels"])
    for r, c in enumerate(rows):
        start = next(s.response_start for s in samples if c in s.completions)
        mine = mb["token_seq"] == r
        assert mb["labels"][mine].tolist() == list(c[start:])
        assert (mb["output_index"][mine] // width == r).all()
    want = [f + j for s, f in zip(samples, firsts, strict=True) for j in range(len(s.completions))]
    assert mb["completion_index"].tolist() == want


def test_loader_attaches_and_saves_the_reference_column(data):
    tok, ds = data
    sampler = ResumableSampler(len(ds.samples), 4, 2, 0, 1, seed=5)
    loader = PreferenceLoader(ds.samples, tok.pad_id, sampler)
    assert "reference_logps" not in loader.next_step()[0]
    table = -torch.arange(1765, dtype=torch.float32)
    loader.reference_logps = table
    state = loader.state_dict()
    mbs = loader.next_step()
    for mb in mbs:
        torch.testing.assert_close(mb["reference_logps"], table[mb["completion_index"]])
    other = PreferenceLoader(ds.samples, tok.pad_id, ResumableSampler(320, 4, 2, 0, 1, seed=5))
    other.load_state_dict(state)
    assert torch.equal(other.reference_logps, table)
    for a, b in zip(other.next_step(), mbs, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"])
        assert torch.equal(a["reference_logps"], b["reference_logps"])
    with pytest.raises(ValueError, match="cover 3 completions, the data has 1765"):
        other.load_state_dict({**state, "reference_logps": torch.zeros(3)})


def test_eval_batches_cover_every_completion_once_over_dp(data):
    _, ds = data
    seen = []
    counts = set()
    for rank in range(3):
        batches = preference_batches(ds.samples[:50], 0, 4, rank, 3)
        counts.add(len(batches))
        seen += [i for mb in batches if not mb["filler"] for i in mb["completion_index"].tolist()]
    total = sum(len(s.completions) for s in ds.samples[:50])
    assert len(counts) == 1 and sorted(seen) == list(range(total))


def _direct(model, mb, reference, beta, loss, eps):
    """Full-vocabulary log-softmax, response tokens gathered by hand, pairs in an fp64 loop."""
    logits = model(mb["input_ids"], attention_mask=mb["attention_mask"]).double()
    logp = torch.log_softmax(logits[..., : model.cfg.vocab_size], -1)
    ids, ranks = mb["input_ids"], mb["ranks"].tolist()
    seqs = []
    for r, length in enumerate(mb["attention_mask"].sum(1).tolist()):
        start = mb["start"][r]
        seqs.append(sum(logp[r, t - 1, ids[r, t]] for t in range(start, length)))
    total, first = 0.0, 0
    for k in mb["group_sizes"].tolist():
        prompt = 0.0
        for i in range(first, first + k):
            for j in range(i + 1, first + k):
                w, lo = (i, j) if ranks[i] < ranks[j] else (j, i)
                h = (seqs[w] - reference[w]) - (seqs[lo] - reference[lo])
                if loss == "dpo":
                    p = torch.sigmoid(beta * h)
                    prompt = prompt - (1 - eps) * torch.log(p) - eps * torch.log(1 - p)
                else:
                    prompt = prompt + (h - 1 / (2 * beta)) ** 2
        total, first = total + prompt / math.comb(k, 2), first + k
    return torch.stack(seqs), total


@pytest.mark.parametrize("loss,eps", [("dpo", 0.0), ("dpo", 0.1), ("ipo", 0.0)])
def test_loss_fn_on_a_model_equals_the_direct_computation(loss, eps):
    g = torch.Generator().manual_seed(2)
    cfg = tiny_config("gpt2")
    samples = []
    for k in (2, 4, 3):
        start = int(torch.randint(2, 8, (1,), generator=g))
        prompt = torch.randint(3, 1000, (start,), generator=g).tolist()
        comps = tuple(
            tuple(prompt + torch.randint(3, 1000, (int(torch.randint(1, 9, (1,), generator=g)),),
                                         generator=g).tolist())
            for _ in range(k)
        )  # fmt: skip
        ranks = tuple((torch.randperm(k, generator=g) + 1).tolist())
        samples.append(PreferenceSample(comps, ranks, "test", start))
    mb = collate_preferences(samples, 0, [0, 2, 6])
    mb["start"] = [s.response_start for s in samples for _ in s.completions]
    ps = single_process_state()
    algo = PreferenceLossConfig(loss=loss, beta=0.5, label_smoothing=eps)

    def run(mdl):
        out = mdl(mb["input_ids"], attention_mask=mb["attention_mask"],
                  output_index=mb["output_index"])  # fmt: skip
        return out

    ref_model = GPTModel(cfg, ps, seed=3)
    _, ref_stats = make_logps_fn(None)(run(ref_model), mb)
    mb["reference_logps"] = ref_stats["logps"]
    model = GPTModel(cfg, ps, seed=4)
    loss_t, sums = make_dpo_loss_fn(3.0, algo, None)(run(model), mb)
    loss_t.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref_seqs, _ = _direct(ref_model, mb, torch.zeros(9, dtype=torch.float64), 0.5, loss, eps)
    torch.testing.assert_close(mb["reference_logps"].double(), ref_seqs.detach(), rtol=1e-5,
                               atol=1e-5)  # fmt: skip
    _, want = _direct(model, mb, ref_seqs.detach(), 0.5, loss, eps)
    (want / 3).backward()
    assert loss_t.item() == pytest.approx(want.item() / 3, rel=1e-5)
    assert summarize([sums[k] for k in sums])["loss"] == pytest.approx(want.item() / 3, rel=1e-5)
    for n, p in model.named_parameters():
        assert rel_err(got[n], p.grad) < 2e-5, n  # fp32 against fp64, relative to the largest
    assert max(p.grad.abs().max().item() for p in model.parameters()) > 1e-3
