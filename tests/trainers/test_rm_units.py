"""Reward-model pieces that need no process group: config validation, the loss function's
normalization, batching of whole prompts, standalone bias normalization, init_from refusals, and
the shipped tiny data."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest
import torch

from megarlhf.checkpoint.init_from import load_init_weights
from megarlhf.config import ConfigError, load_config
from megarlhf.config.rm import RMRunConfig
from megarlhf.config.sft import SFTRunConfig
from megarlhf.data.ranking_loader import RankingLoader
from megarlhf.data.rankings import collate_rankings, load_ranking_dataset
from megarlhf.data.sampler import ResumableSampler, even_split
from megarlhf.data.tokenizer import load_tokenizer
from megarlhf.model.gpt import GPTModel
from megarlhf.parallel.state import single_process_state
from megarlhf.trainers.rm import (
    demonstration_batches,
    make_rm_loss_fn,
    normalize_reward_bias,
    summarize,
)
from tests.model.common import tiny_config
from tests.trainers.common import ROOT, TINY
from tests.trainers.rm_common import (
    DEMOS,
    RM_TINY,
    demo_reward_mean,
    pairwise_loss,
    save_lm_checkpoint,
)

TOKENIZER = ROOT / "data" / "tokenizer"


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.head=lm", "model.head: a reward model needs model.head=scalar"),
        ("model.num_head_outputs=2", "model.num_head_outputs: the ranking loss trains one"),
        ("data.max_k=1", "data.max_k: must be in [2, 64]"),
        ("rm.micro_batch_size=0", "rm.micro_batch_size: must be >= 1"),
        ("data.seq_len=512", "data.seq_len: 512 exceeds model.max_seq_len=128"),
        ("rm.normalise_files=[x]", "unknown config key(s): rm.normalise_files"),
    ],
)
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(RMRunConfig, RM_TINY, [override])


def test_global_batch_in_prompts_sets_grad_accum():
    cfg = load_config(RMRunConfig, RM_TINY, ["rm.micro_batch_size=2", "rm.global_batch_size=8"])
    assert [cfg.resolved_passes(dp).grad_accum for dp in (1, 2, 4)] == [4, 2, 1]
    with pytest.raises(ConfigError, match="rm.global_batch_size: 8 prompts is not a multiple"):
        cfg.resolved_passes(3)


def test_shipped_sft_and_rm_configs_share_the_model():
    """So `--init-from` an SFT run of configs/sft_tiny.yaml works with configs/rm_tiny.yaml."""
    sft = load_config(SFTRunConfig, TINY).model
    rm = load_config(RMRunConfig, RM_TINY).model
    assert dataclasses.replace(sft, head="scalar") == rm


def _samples(ks, seed=0):
    from megarlhf.data.rankings import RankingSample

    g = torch.Generator().manual_seed(seed)
    out = []
    for k in ks:
        comps = tuple(
            tuple(torch.randint(3, 100, (3 + i,), generator=g).tolist()) for i in range(k)
        )
        out.append(RankingSample(comps, tuple((torch.randperm(k, generator=g) + 1).tolist()), "t"))
    return out


def test_loss_fn_gives_the_global_prompt_mean_over_micro_batches():
    """Summed over micro-batches, losses normalized by the global prompt count equal the
    pair-by-pair mean over all prompts; fillers count nothing; statistics add up."""
    samples = _samples([2, 9, 4, 3, 7])
    mbs = [collate_rankings(samples[:2], 0), collate_rankings(samples[2:], 0)]
    scores = [torch.randn(mb["input_ids"].shape[0], mb["input_ids"].shape[1], 1) for mb in mbs]
    loss_fn = make_rm_loss_fn(5.0)
    out = [loss_fn(s, mb) for s, mb in zip(scores, mbs, strict=True)]
    rewards = torch.cat([
        s[torch.arange(len(mb["input_ids"])), mb["attention_mask"].sum(1) - 1, 0]
        for s, mb in zip(scores, mbs, strict=True)
    ])  # fmt: skip
    ranks = torch.cat([mb["ranks"] for mb in mbs]).tolist()
    want = pairwise_loss(rewards, ranks, [2, 9, 4, 3, 7])
    torch.testing.assert_close(sum(loss for loss, _ in out), want)
    stats = [st for _, st in out]
    sums = [sum(float(s[k]) for s in stats) for k in ("loss_sum", "prompts", "pairs")]
    assert sums[0] / 5 == pytest.approx(want.item(), rel=1e-6)
    assert sums[1:] == [5, sum(math.comb(k, 2) for k in (2, 9, 4, 3, 7))]
    rec = summarize([sum(float(s[k]) for s in stats) for k in _sum_keys()])
    assert rec["reward_mean"] == pytest.approx(rewards.mean().item(), rel=1e-6)
    assert rec["reward_std"] == pytest.approx(rewards.std(unbiased=False).item(), rel=1e-5)
    filler = {**mbs[0], "filler": True}
    _, st = loss_fn(scores[0], filler)
    assert all(st[k] == 0 for k in _sum_keys())


def _sum_keys():
    from megarlhf.trainers.rm import _SUMS

    return _SUMS


def test_even_split_gives_every_rank_the_same_count_and_covers_all():
    for n, m, dp in [(64, 4, 4), (7, 2, 2), (3, 4, 2), (1, 3, 4), (10, 1, 3)]:
        per_rank = [even_split(n, m, r, dp) for r in range(dp)]
        assert len({len(p) for p in per_rank}) == 1, (n, m, dp)
        real = sorted(i for p in per_rank for idx, filler in p if not filler for i in idx)
        assert real == list(range(n))
        assert all(len(idx) <= m for p in per_rank for idx, _ in p)


def test_ranking_loader_holds_whole_prompts_and_resumes():
    tok = load_tokenizer(TOKENIZER)
    data = load_ranking_dataset([str(ROOT / "data/rm_tiny.jsonl")], tok, 128)

    def loader():
        return RankingLoader(data.samples, tok.pad_id, ResumableSampler(320, 4, 2, 1, 2, 7))

    a = loader()
    step = a.next_step()
    assert len(step) == 2 and all(len(mb["group_sizes"]) == 4 for mb in step)
    for mb in step:
        assert mb["input_ids"].shape[0] == int(mb["group_sizes"].sum()) == len(mb["ranks"])
    state = a.state_dict()
    b = loader()
    b.load_state_dict(state)
    for x, y in zip(a.next_step(), b.next_step(), strict=True):
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_normalize_reward_bias_standalone_makes_the_demonstration_mean_zero():
    cfg = tiny_config("gpt2", head="scalar", vocab_size=512, max_seq_len=128)
    model = GPTModel(cfg, single_process_state(), seed=3)
    before = demo_reward_mean(model)  # leaves the model in eval mode
    assert abs(before) > 1e-3
    ps = single_process_state()
    batches = demonstration_batches([DEMOS], load_tokenizer(TOKENIZER), 128, "auto", 16, ps)
    bias = model.head.bias.detach().clone()
    model.train(True)
    mean = normalize_reward_bias(model, batches, ps)
    assert model.training  # scored without dropout, then the mode is restored
    assert mean == pytest.approx(before, rel=1e-5)
    assert abs(demo_reward_mean(model)) < 1e-5
    torch.testing.assert_close(model.head.bias.detach(), bias - mean)


def test_init_from_untied_lm_drops_output_weight(tmp_path):
    lm = tiny_config("llama", vocab_size=512)  # untied: output.weight is its own tensor
    weights = save_lm_checkpoint(tmp_path / "lm", lm, seed=1)
    assert "output.weight" in weights
    rm = GPTModel(dataclasses.replace(lm, head="scalar"), single_process_state(), seed=4)
    head = {n: p.detach().clone() for n, p in rm.named_parameters() if n.startswith("head.")}
    info = load_init_weights(rm, tmp_path / "lm", single_process_state())
    assert info["dropped"] == ["output.weight"] and info["fresh"] == ["head.bias", "head.weight"]
    for name, p in rm.named_parameters():
        want = head[name] if name.startswith("head.") else weights[name]
        assert torch.equal(p.detach(), want), name


def test_init_from_refusals(tmp_path):
    cfg = tiny_config("gpt2", vocab_size=512)
    save_lm_checkpoint(tmp_path / "lm", cfg, seed=1)
    wider = GPTModel(tiny_config("gpt2", vocab_size=512, hidden_size=32, head="scalar"),
                     single_process_state())  # fmt: skip
    with pytest.raises(
        ConfigError, match=r"holds a different model: .*model.hidden_size=64 \(config has 32\)"
    ):
        load_init_weights(wider, tmp_path / "lm", single_process_state())
    rm = GPTModel(dataclasses.replace(cfg, head="scalar"), single_process_state())
    from megarlhf.checkpoint.model_shards import save_model_shard

    weights = {n: p.detach() for n, p in rm.named_parameters()}
    save_model_shard(tmp_path / "rm", weights, rm.cfg, tp=1, tp_rank=0, pp=1, pp_rank=0)
    lm = GPTModel(cfg, single_process_state())
    with pytest.raises(ConfigError, match="a language model cannot start from it"):
        load_init_weights(lm, tmp_path / "rm", single_process_state())
    load_init_weights(GPTModel(rm.cfg, single_process_state(), seed=9), tmp_path / "rm",
                      single_process_state())  # scalar -> scalar loads everything  # fmt: skip


def test_tiny_rm_data_is_reproducible_and_consistent(tmp_path):
    from tools.make_tiny_rm_data import main as generate
    from tools.make_tiny_rm_data import make_rows, quality

    generate(["--output", str(tmp_path / "t.jsonl"), "--eval-output", str(tmp_path / "e.jsonl")])
    assert (tmp_path / "t.jsonl").read_bytes() == (ROOT / "data/rm_tiny.jsonl").read_bytes()
    assert (tmp_path / "e.jsonl").read_bytes() == (ROOT / "data/rm_tiny_eval.jsonl").read_bytes()
    rows = make_rows(384, 1)
    ks = set()
    for row, tiers in rows:
        if "chosen" in row:
            assert quality(tiers[0]) > quality(tiers[1])
            ks.add(2)
            continue
        ks.add(len(tiers))
        by_rank = sorted(zip(row["ranking"], tiers, strict=True))
        assert [quality(t) for _, t in by_rank] == sorted((quality(t) for t in tiers), reverse=True)
    assert ks == set(range(2, 10))
    train = {json.loads(x)["prompt"] for x in (ROOT / "data/rm_tiny.jsonl").open()}
    held_out = {json.loads(x)["prompt"] for x in (ROOT / "data/rm_tiny_eval.jsonl").open()}
    assert len(train) == 320 and len(held_out) == 64 and not train & held_out
