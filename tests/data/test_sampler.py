"""Resumable sampler and loader: coverage, data-parallel split, exact resume at any step."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from megarlhf.config.data import DataConfig, TextFormatConfig
from megarlhf.data.loader import build_sft_loader
from megarlhf.data.sampler import ResumableSampler
from megarlhf.data.tokenizer import load_tokenizer

REPO = Path(__file__).parents[2]
MBS, GA = 2, 3  # with dp_size=2 and 50 rows: global batch 12, 4 steps per epoch, 2 unused


def _steps(sampler, n):
    return [sampler.next_step() for _ in range(n)]


def test_epoch_covers_distinct_rows_in_a_fresh_order():
    s = ResumableSampler(23, micro_batch_size=2, grad_accum=1, dp_rank=0, dp_size=1, seed=3)
    assert s.steps_per_epoch == 11
    epochs = []
    for _ in range(3):
        rows = [i for step in _steps(s, 11) for mb in step for i in mb]
        assert len(set(rows)) == 22 and all(0 <= i < 23 for i in rows)
        epochs.append(rows)
    assert epochs[0] != epochs[1] != epochs[2]
    assert s.epoch == 3 and s.position == 0


@pytest.mark.parametrize("dp_size", [2, 4])
def test_global_batch_is_the_same_for_any_dp_size(dp_size):
    per_rank = 12 // dp_size
    single = ResumableSampler(50, 4, 3, 0, 1, seed=9)
    ranks = [ResumableSampler(50, per_rank // 3, 3, r, dp_size, seed=9) for r in range(dp_size)]
    for _ in range(9):  # crosses two epoch boundaries (4 steps per epoch)
        want = [i for mb in single.next_step() for i in mb]
        got = [i for s in ranks for mb in s.next_step() for i in mb]
        assert got == want


@pytest.mark.parametrize("stop", [0, 1, 3, 4, 5, 8, 9])  # 4 steps per epoch: 4, 8 are boundaries
def test_resume_continues_at_exactly_the_next_rows(stop):
    make = lambda: [ResumableSampler(50, MBS, GA, r, 2, seed=1) for r in range(2)]
    straight = make()
    want = [[s.next_step() for s in straight] for _ in range(12)]
    first = make()
    for _ in range(stop):
        for s in first:
            s.next_step()
    states = [json.loads(json.dumps(s.state_dict())) for s in first]  # survives JSON
    if stop in (4, 8):
        assert states[0]["epoch"] == stop // 4 and states[0]["position"] == 0
    resumed = make()
    for s, st in zip(resumed, states, strict=True):
        s.load_state_dict(st)
    assert [[s.next_step() for s in resumed] for _ in range(12 - stop)] == want[stop:]


def test_resume_refuses_other_data_or_batch():
    state = ResumableSampler(50, 2, 3, 0, 2, seed=1).state_dict()
    with pytest.raises(ValueError, match="saved with num_rows=50, this run has num_rows=49"):
        ResumableSampler(49, 2, 3, 0, 2, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="global_batch_size=12, this run has global_batch_size=8"):
        ResumableSampler(50, 2, 2, 0, 2, seed=1).load_state_dict(state)
    ResumableSampler(50, 3, 2, 0, 2, seed=1).load_state_dict(state)  # same global batch: fine
    ResumableSampler(50, 2, 6, 0, 1, seed=1).load_state_dict(state)  # dp size may change
    with pytest.raises(ValueError, match="fewer than one global batch of 24"):
        ResumableSampler(23, 2, 3, 0, 4, seed=1)


def test_loader_batches_and_resume_on_shipped_data():
    cfg = DataConfig(
        train_files=[str(REPO / "data" / "sft_tiny.jsonl")],
        text=TextFormatConfig(tokenizer=str(REPO / "data" / "tokenizer")),
        seq_len=128,
    )
    tok = load_tokenizer(cfg.text.tokenizer)
    make = lambda r: build_sft_loader(
        cfg, tok, micro_batch_size=2, grad_accum=2, dp_rank=r, dp_size=2
    )
    a = make(1)
    n_samples = sum(len(r) for r in a.rows)
    assert n_samples == 200 and len(a.rows) < 200  # packed, nothing lost
    tokens = sum(len(a.samples[i]) for r in a.rows for i in r)
    assert sum(int((a.collate([r])["segment_ids"] > 0).sum()) for r in range(len(a.rows))) == tokens
    steps = a.steps_per_epoch
    for _ in range(steps):
        a.next_step()
    state = a.state_dict()
    assert state["epoch"] == 1 and state["position"] == 0 and a.epoch == 1
    want = a.next_step()
    b = make(1)
    b.load_state_dict(state)
    got = b.next_step()
    assert len(got) == 2 and got[0]["input_ids"].shape == (2, 128)
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys() and all(torch.equal(g[k], w[k]) for k in g)
    # the two data-parallel ranks of a step never share a row
    r0, r1 = make(0).sampler.next_step(), make(1).sampler.next_step()
    assert not set(np.ravel(r0)) & set(np.ravel(r1))
