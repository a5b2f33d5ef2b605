"""Dropout randomness under TP: replicated activations see the same mask on every TP rank, sharded
attention probabilities see different masks; recomputation replays both exactly."""

import torch

from megarlhf.model.gpt import GPTModel
from megarlhf.parallel.random import RNGStatesTracker, default_seed
from megarlhf.parallel.state import build_parallel_state
from tests.dist import run_ranks
from tests.model.common import reference_model, tiny_config


def _dropout_streams(rank, world):
    ps = build_parallel_state(tp=2)
    cfg = tiny_config("llama", hidden_dropout=0.2, attention_dropout=0.2)
    torch.manual_seed(default_seed(5, ps))
    model = GPTModel(cfg, ps, post_process=False, seed=5).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    hidden = model(ids)
    with model.rng.fork():
        tp_draw = torch.rand(6)
    default_draw = torch.rand(6)
    return hidden.detach(), tp_draw, default_draw


def test_replicated_dropout_matches_and_sharded_dropout_differs():
    (h0, tp0, d0), (h1, tp1, d1) = run_ranks(_dropout_streams, 2, timeout=120)
    # Hidden states are replicated across TP: identical only if their dropout masks agree.
    assert torch.equal(h0, h1)
    assert torch.equal(d0, d1)
    assert not torch.equal(tp0, tp1)


def test_fork_leaves_default_stream_untouched():
    tracker = RNGStatesTracker(seed=99)
    torch.manual_seed(0)
    expect = torch.rand(4)
    torch.manual_seed(0)
    with tracker.fork():
        inside = torch.rand(4)
    assert torch.equal(torch.rand(4), expect)
    with tracker.fork():
        assert not torch.equal(torch.rand(4), inside)  # the stream advanced


def test_recompute_replays_dropout_exactly():
    grads = []
    for recompute in (False, True):
        cfg = tiny_config(
            "gpt2", hidden_dropout=0.3, attention_dropout=0.3, activation_recompute=recompute
        )
        model = reference_model(cfg).train()
        torch.manual_seed(123)
        ids = torch.randint(0, cfg.vocab_size, (2, 10))
        model(ids).float().logsumexp(-1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        assert torch.equal(g, grads[1][name]), name
