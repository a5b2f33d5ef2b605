"""Packed layouts: first-fit-decreasing rows, index maps back to per-sequence tensors, and the
model's outputs on packed rows equal its outputs on each sequence alone."""

from __future__ import annotations

import torch

from megarlhf.engine.packing import IGNORE, build_layout, first_fit_decreasing, row_groups
from megarlhf.model.gpt import GPTModel
from megarlhf.parallel.state import single_process_state
from tests.model.common import tiny_config


def test_first_fit_decreasing_by_hand():
    # lengths 5 4 3 3 2 1 in rows of 6: 5+1 | 4+2 | 3+3
    assert first_fit_decreasing([3, 5, 1, 4, 3, 2], 6) == [[1, 2], [3, 5], [0, 4]]
    assert [list(g) for g in row_groups(5, 10, 25)] == [[0, 1], [2, 3], [4]]
    assert [list(g) for g in row_groups(3, 10, 5)] == [[0], [1], [2]]  # at least one row


def _sequences(seed=0, b=6, t=5):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(4, 60, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g)
               for _ in range(b)]  # fmt: skip
    responses = [torch.randint(4, 60, (int(torch.randint(0, t + 1, (1,), generator=g)),),
                               generator=g) for _ in range(b)]  # fmt: skip
    return prompts, responses


def test_layout_maps_and_labels():
    prompts, responses = _sequences()
    lay = build_layout(prompts, responses, 5, pad_id=0, pack=True, width=16)
    ids = lay.input_ids.view(-1)
    labels = lay.labels.view(-1)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        n = len(r)
        # The position predicting response token t holds the token before it, its label is t.
        got_prev = ids[lay.resp_index[i, :n]]
        want_prev = torch.cat([p, r])[len(p) - 1 : len(p) + n - 1]
        assert torch.equal(got_prev, want_prev)
        assert torch.equal(labels[lay.resp_index[i, :n]], r)
        assert ids[lay.last_index[i]] == torch.cat([p, r])[-1]
    assert int((labels != IGNORE).sum()) == sum(len(r) for r in responses)
    mask = torch.zeros(6, 5)
    for i, r in enumerate(responses):
        mask[i, : len(r)] = 1
    x = torch.randn(6, 5) * mask
    assert torch.equal(lay.from_flat(lay.to_packed(x, mask).reshape(-1), mask), x)
    assert lay.rows < 6  # several sequences share rows


def test_packed_logits_equal_each_sequence_alone():
    cfg = tiny_config("llama", vocab_size=64, max_seq_len=32)
    model = GPTModel(cfg, single_process_state(), seed=3).eval()
    prompts, responses = _sequences(seed=1)
    lay = build_layout(prompts, responses, 5, pad_id=0, pack=True)
    with torch.no_grad():
        packed = model(lay.input_ids, position_ids=lay.position_ids, segment_ids=lay.segment_ids)
        flat = packed.reshape(-1, packed.shape[-1])
        for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            alone = model(torch.cat([p, r])[None])[0]
            n = len(r)
            if n:
                want = alone[len(p) - 1 : len(p) + n - 1]
                torch.testing.assert_close(flat[lay.resp_index[i, :n]], want, atol=1e-5, rtol=0)
            torch.testing.assert_close(flat[lay.last_index[i]], alone[-1], atol=1e-5, rtol=0)
