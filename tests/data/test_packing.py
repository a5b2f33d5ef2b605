"""Packing: first-fit against a brute-force reference, a hand-computed batch, and packed loss and
gradients equal to running each sample alone through a small causal LM with explicit masks."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megarlhf.data.packing import collate_rows, collate_unpacked, first_fit_pack
from megarlhf.data.sft import Sample


def _brute_first_fit(lengths, seq_len, seed):
    rows, free = [], []
    for i in np.random.default_rng(seed).permutation(len(lengths)).tolist():
        r = next((r for r, f in enumerate(free) if f >= lengths[i]), len(rows))
        if r == len(rows):
            rows.append([])
            free.append(seq_len)
        rows[r].append(i)
        free[r] -= lengths[i]
    return rows


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_first_fit_matches_brute_force(seed):
    lengths = np.random.default_rng(100 + seed).integers(1, 65, size=301).tolist()
    rows = first_fit_pack(lengths, 64, seed)
    assert rows == _brute_first_fit(lengths, 64, seed)
    assert sorted(i for r in rows for i in r) == list(range(301))
    assert all(sum(lengths[i] for i in r) <= 64 for r in rows)
    assert first_fit_pack(lengths, 64, seed) == rows  # deterministic
    assert first_fit_pack(lengths, 64, seed + 1) != rows


def test_first_fit_rejects_a_sample_longer_than_the_row():
    with pytest.raises(ValueError, match="sample 1 has length 9, not in"):
        first_fit_pack([3, 9], 8, 0)


def test_collate_hand_computed():
    a = Sample((10, 11, 12, 13), (False, False, True, True), "a")
    b = Sample((20, 21, 22), (False, True, True), "b")
    batch = collate_rows([[a, b], [b]], seq_len=9, pad_id=5)
    assert batch["input_ids"].tolist() == [
        [10, 11, 12, 13, 20, 21, 22, 5, 5],
        [20, 21, 22, 5, 5, 5, 5, 5, 5],
    ]
    x = -100
    assert batch["labels"].tolist() == [
        [x, 12, 13, x, 21, 22, x, x, x],
        [21, 22, x, x, x, x, x, x, x],
    ]
    assert batch["position_ids"].tolist() == [
        [0, 1, 2, 3, 0, 1, 2, 0, 0],
        [0, 1, 2, 0, 0, 0, 0, 0, 0],
    ]
    assert batch["segment_ids"].tolist() == [
        [1, 1, 1, 1, 2, 2, 2, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 0],
    ]
    assert all(v.dtype == torch.long and v.shape == (2, 9) for v in batch.values())
    assert collate_unpacked([b], 9, 5)["labels"].tolist() == batch["labels"][1:].tolist()
    with pytest.raises(ValueError, match="more than seq_len=6"):
        collate_rows([[a, b]], seq_len=6, pad_id=5)


# ----------------------------------------------------------------------------- loss equivalence

V, H = 37, 16


class TinyCausalLM(torch.nn.Module):
    """Embeddings + learned positions, one attention layer with an explicit mask, an MLP, a head."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        p = lambda *s: torch.nn.Parameter(torch.randn(*s, generator=g, dtype=torch.float64) * 0.3)
        self.emb, self.pos = p(V, H), p(64, H)
        self.qkv, self.proj, self.mlp, self.head = p(H, 3 * H), p(H, H), p(H, H), p(H, V)

    def forward(self, ids, pos, mask):
        """ids, pos: [B, S]; mask: [B, S, S] bool (query, key) -> logits [B, S, V]."""
        x = self.emb[ids] + self.pos[pos]
        q, k, v = (x @ self.qkv).split(H, dim=-1)
        att = (q @ k.transpose(1, 2) / math.sqrt(H)).masked_fill(~mask, float("-inf"))
        x = x + att.softmax(-1) @ v @ self.proj
        x = x + torch.tanh(x @ self.mlp)
        return x @ self.head


def _segment_mask(segment_ids):
    s = segment_ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    return causal & (segment_ids[:, :, None] == segment_ids[:, None, :])


def _batch_loss_and_grads(model, batch, mask):
    model.zero_grad()
    logits = model(batch["input_ids"], batch["position_ids"], mask)
    labels = batch["labels"]
    loss = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), reduction="sum")
    loss = loss / (labels != -100).sum()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def _alone_loss_and_grads(model, samples):
    """Each sample run by itself (no padding, plain causal mask); targets from its own mask."""
    model.zero_grad()
    total, count = 0.0, 0
    for s in samples:
        ids = torch.tensor([s.input_ids])
        n = ids.shape[1]
        logits = model(ids, torch.arange(n)[None], torch.ones(1, n, n, dtype=torch.bool).tril())
        # position t predicts token t+1, counted when token t+1 is trained
        trained = torch.tensor(s.loss_mask[1:])
        per_token = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")
        total = total + per_token[trained].sum()
        count += int(trained.sum())
    loss = total / count
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def _random_samples(n, seed):
    g = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(g.integers(3, 21))
        prompt = int(g.integers(1, length))  # at least one untrained context token
        ids = tuple(g.integers(3, V, size=length).tolist())
        out.append(Sample(ids, (False,) * prompt + (True,) * (length - prompt), f"s{i}"))
    return out


def test_packed_loss_and_grads_equal_samples_alone():
    samples = _random_samples(14, seed=3)
    rows = first_fit_pack([len(s) for s in samples], 32, seed=5)
    assert any(len(r) >= 3 for r in rows)  # real packing happens
    packed = collate_rows([[samples[i] for i in r] for r in rows], 32, pad_id=0)
    model = TinyCausalLM()
    ref_loss, ref_grads = _alone_loss_and_grads(model, samples)

    loss, grads = _batch_loss_and_grads(model, packed, _segment_mask(packed["segment_ids"]))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)

    unpacked = collate_unpacked(samples, 32, pad_id=0)
    loss_u, grads_u = _batch_loss_and_grads(model, unpacked, _segment_mask(unpacked["segment_ids"]))
    torch.testing.assert_close(loss_u, ref_loss, rtol=1e-12, atol=0)
    for g, r in zip(grads_u, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)

    # Control: ignoring segment_ids lets samples see each other, and the loss changes.
    causal = torch.ones(1, 32, 32, dtype=torch.bool).tril().expand(len(rows), 32, 32)
    leaky, _ = _batch_loss_and_grads(model, packed, causal)
    assert abs(leaky - ref_loss) > 1e-4
