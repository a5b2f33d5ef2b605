"""KV-cache decoding: cached logits equal a full forward at every position; TP=2 generation equals
TP=1 token for token; left-padded rows equal the same prompts run alone; EOS masking; a
vocab_limit (the tokenizer's size) keeps every sampled id below it, at TP=1 and TP=2 alike."""

import pytest
import torch

from megarlhf.config import GenerationConfig
from megarlhf.model.generation import filter_logits, generate, left_pad
from megarlhf.model.gpt import GPTModel
from megarlhf.model.kv_cache import KVCache
from megarlhf.parallel.state import build_parallel_state
from tests.dist import run_ranks
from tests.model.common import reference_model, rel_err, tiny_config


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_kv_cache_logits_equal_full_forward(family):
    cfg = tiny_config(family)
    model = reference_model(cfg).eval()
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    seqs = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (9, 5, 12)]
    ids, mask = left_pad(seqs, 0)
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        cache = KVCache(
            cfg.num_layers, 3, cfg.num_kv_heads, ids.shape[1], cfg.head_dim, torch.float32
        )
        # prefill 4 positions, then one position at a time
        steps = [model(ids[:, :4], attention_mask=mask[:, :4], kv_cache=cache)]
        for t in range(4, ids.shape[1]):
            steps.append(
                model(ids[:, t : t + 1], attention_mask=mask[:, t : t + 1], kv_cache=cache)
            )
    cached = torch.cat(steps, dim=1)
    valid = mask.bool()
    assert rel_err(cached[valid][:, : cfg.vocab_size], full[valid][:, : cfg.vocab_size]) <= 1e-5


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_left_padded_rows_equal_rows_alone(family):
    cfg = tiny_config(family)
    model = reference_model(cfg)
    seqs = [[5, 17, 33, 2, 9, 100, 7], [44, 3], [8, 8, 8, 900]]
    ids, mask = left_pad(seqs, 0)
    gen = GenerationConfig(max_new_tokens=12, temperature=0.0)
    batch = generate(model, ids, mask, gen, eos_id=None, pad_id=0)
    for i, s in enumerate(seqs):
        alone_ids, alone_mask = left_pad([s], 0)
        alone = generate(model, alone_ids, alone_mask, gen, eos_id=None, pad_id=0)
        assert batch.responses[i].tolist() == alone.responses[0].tolist()
        assert torch.allclose(batch.logprobs[i], alone.logprobs[0], rtol=0, atol=1e-5)


def test_generated_logprobs_equal_recomputation():
    cfg = tiny_config("llama")
    model = reference_model(cfg)
    ids, mask = left_pad([[1, 2, 3, 4], [9, 10]], 0)
    gen = GenerationConfig(max_new_tokens=10, temperature=0.7, top_k=50, top_p=0.9, seed=3)
    out = generate(model, ids, mask, gen, eos_id=None, pad_id=0)
    with torch.no_grad():
        logits = model(out.sequences, attention_mask=out.attention_mask)[..., : cfg.vocab_size]
    p = ids.shape[1]
    logp = torch.log_softmax(logits[:, p - 1 : -1].float() / 0.7, -1)
    ref = logp.gather(-1, out.responses[..., None]).squeeze(-1)
    assert (out.logprobs - ref).abs().max() <= 1e-5


def test_eos_stops_row_and_masks_rest():
    cfg = tiny_config("gpt2")
    model = reference_model(cfg)
    ids, mask = left_pad([[1, 2, 3], [4, 5, 6]], 0)
    gen = GenerationConfig(max_new_tokens=8, temperature=0.0)
    free = generate(model, ids, mask, gen, eos_id=None, pad_id=0)
    eos = free.responses[0, 2].item()  # make row 0's third token the EOS
    out = generate(model, ids, mask, gen, eos_id=eos, pad_id=0)
    row = out.responses[0].tolist()
    stop = row.index(eos)
    assert stop <= 2
    assert out.response_mask[0].tolist() == [True] * (stop + 1) + [False] * (7 - stop)
    assert row[stop + 1 :] == [0] * (7 - stop)
    assert (out.logprobs[0, stop + 1 :] == 0).all()


def test_filter_logits_top_k_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    assert torch.isinf(filter_logits(logits, 2, 1.0)).tolist() == [[False, False, True, True]]
    # nucleus 0.7: 0.5 < 0.7 so the second token is needed, the third is not
    assert torch.isinf(filter_logits(logits, 0, 0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, 0, 0.5)).tolist() == [[False, True, True, True]]


def _generate_tp(rank, world, family, gen_kw, vocab_limit=None):
    cfg = tiny_config(family)
    ps = build_parallel_state(tp=world)
    model = GPTModel(cfg, ps, seed=7)
    ids, mask = left_pad([[5, 17, 33, 2, 9], [44, 3], [8, 8, 8, 900, 1, 2]], 0)
    gen = GenerationConfig(**gen_kw)
    out = generate(model, ids, mask, gen, eos_id=None, pad_id=0, vocab_limit=vocab_limit)
    return out.responses, out.logprobs


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize(
    "gen_kw",
    [
        dict(max_new_tokens=16, temperature=0.0),
        dict(max_new_tokens=16, temperature=0.9, top_k=40, top_p=0.95, seed=11),
    ],
    ids=["greedy", "sampled"],
)
def test_tp2_generation_equals_tp1(family, gen_kw):
    cfg = tiny_config(family)
    ref = reference_model(cfg)
    ids, mask = left_pad([[5, 17, 33, 2, 9], [44, 3], [8, 8, 8, 900, 1, 2]], 0)
    expect = generate(ref, ids, mask, GenerationConfig(**gen_kw), eos_id=None, pad_id=0)
    for responses, logprobs in run_ranks(_generate_tp, 2, family, gen_kw, timeout=180):
        assert responses.tolist() == expect.responses.tolist()
        assert (logprobs - expect.logprobs).abs().max() <= 1e-5


def test_dropping_finished_rows_changes_no_token(monkeypatch):
    """Rows that emitted EOS are dropped from the computed batch (the KV cache is compacted);
    the tokens and log-probs equal a run that keeps computing every row."""
    from megarlhf.model import generation

    cfg = tiny_config("llama", vocab_size=8, max_seq_len=64)
    model = reference_model(cfg)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(4, 8, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g)
               for _ in range(8)]  # fmt: skip
    ids, mask = left_pad([p.tolist() for p in prompts], 0)
    gen = GenerationConfig(max_new_tokens=24, temperature=1.0, seed=11)
    compactions = []
    select = KVCache.select_rows
    monkeypatch.setattr(
        KVCache,
        "select_rows",
        lambda self, rows: (compactions.append(len(rows)), select(self, rows)),
    )
    dropped = generate(model, ids, mask, gen, eos_id=3, pad_id=0)
    assert compactions, "no row finished early: the test draws too few EOS"
    monkeypatch.setattr(generation._Decode, "maybe_compact", lambda self: None)
    kept = generate(model, ids, mask, gen, eos_id=3, pad_id=0)
    assert torch.equal(dropped.responses, kept.responses)
    assert torch.equal(dropped.response_mask, kept.response_mask)
    torch.testing.assert_close(dropped.logprobs, kept.logprobs, atol=1e-6, rtol=0)
    lengths = dropped.response_mask.sum(-1)
    assert lengths.min() < lengths.max()  # rows really stopped at different steps


# 600 of 1003 ids: past the first TP=2 shard (1008 padded / 2 = 504 rows), short of the vocabulary.
LIMIT = 600


def test_vocab_limit_keeps_every_sampled_id_below_it():
    cfg = tiny_config("llama")
    model = reference_model(cfg)
    ids, mask = left_pad([[1, 2, 3, 4], [9, 10], [7]], 0)
    gen = GenerationConfig(max_new_tokens=24, temperature=1.0, seed=5)
    free = generate(model, ids, mask, gen, eos_id=None, pad_id=0)
    assert free.responses.max() >= LIMIT  # without a limit the model does draw such ids
    out = generate(model, ids, mask, gen, eos_id=None, pad_id=0, vocab_limit=LIMIT)
    assert out.responses.max() < LIMIT
    # The log-probs are those of the distribution over the ids < LIMIT it was drawn from.
    with torch.no_grad():
        logits = model(out.sequences, attention_mask=out.attention_mask)[..., :LIMIT]
    p = ids.shape[1]
    ref = torch.log_softmax(logits[:, p - 1 : -1].float(), -1)
    ref = ref.gather(-1, out.responses[..., None]).squeeze(-1)
    assert (out.logprobs - ref).abs().max() <= 1e-5
    greedy = GenerationConfig(max_new_tokens=24, temperature=0.0)
    assert generate(model, ids, mask, greedy, None, 0, vocab_limit=LIMIT).responses.max() < LIMIT
    for bad in (0, cfg.vocab_size + 1):
        with pytest.raises(ValueError, match="vocab_limit"):
            generate(model, ids, mask, gen, eos_id=None, pad_id=0, vocab_limit=bad)


def test_tp2_generation_with_vocab_limit_equals_tp1():
    cfg = tiny_config("gpt2")
    gen_kw = dict(max_new_tokens=16, temperature=1.0, seed=11)
    ids, mask = left_pad([[5, 17, 33, 2, 9], [44, 3], [8, 8, 8, 900, 1, 2]], 0)
    expect = generate(reference_model(cfg), ids, mask, GenerationConfig(**gen_kw), None, 0,
                      vocab_limit=LIMIT)  # fmt: skip
    assert expect.responses.max() < LIMIT
    for responses, logprobs in run_ranks(_generate_tp, 2, "gpt2", gen_kw, LIMIT, timeout=180):
        assert responses.tolist() == expect.responses.tolist()
        assert (logprobs - expect.logprobs).abs().max() <= 1e-5
