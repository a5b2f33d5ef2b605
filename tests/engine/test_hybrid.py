"""HybridEngine rollouts: a TP2 x PP2 actor generating in a TP=1 x DP=4 generation layout.

Each generation-DP rank's share of an uneven prompt batch (6 prompts over 4 ranks) equals a
single-process generation of that share with the same weights and the rank's seed; every rank
receives the whole batch in prompt order; the generation copy is released after the rollout; the
reported log-probs match the reference within fp32 rounding (<= 1e-5).
"""

from __future__ import annotations

import weakref

import torch

from megarlhf.config import GenerationConfig
from megarlhf.engine.hybrid import HybridEngine, rollout_seed, slice_bounds
from megarlhf.model.generation import generate, left_pad
from megarlhf.model.gpt import GPTModel
from megarlhf.parallel.state import build_parallel_state
from tests.dist import run_ranks
from tests.model.common import reference_model, tiny_config

PROMPTS = [[5, 17, 33], [44, 3, 9, 9, 1], [7], [8, 8, 8, 2], [11, 12], [100, 200, 300, 400, 500]]
GEN = GenerationConfig(max_new_tokens=6, temperature=0.8, top_k=50, seed=3)
EOS = 2


def _worker(rank, world):
    cfg = tiny_config("gpt2", num_layers=4)
    train_ps = build_parallel_state(tp=2, pp=2)
    gen_ps = build_parallel_state(tp=1, pp=1)
    actor = GPTModel(cfg, train_ps, seed=7)
    engine = HybridEngine(actor, gen_ps, GEN, eos_id=EOS, pad_id=0)
    built = []
    build = engine.build_generation_model

    def tracked():
        model = build()
        built.append(weakref.ref(model))
        return model

    engine.build_generation_model = tracked
    samples = engine.rollout(PROMPTS, step=4)
    released = all(r() is None for r in built) and len(built) == 1
    return [(s.prompt, s.response, s.logprobs) for s in samples], released, engine.timings


def test_hybrid_rollout_tp2pp2_to_dp4():
    cfg = tiny_config("gpt2", num_layers=4)
    ref = reference_model(cfg)
    expect = []
    for dp_rank in range(4):
        lo, hi = slice_bounds(len(PROMPTS), dp_rank, 4)
        ids, mask = left_pad(PROMPTS[lo:hi], 0)
        gen = torch.Generator().manual_seed(rollout_seed(GEN.seed, 4, dp_rank))
        out = generate(ref, ids, mask, GEN, EOS, 0, gen)
        for i in range(hi - lo):
            n = int(out.response_mask[i].sum())
            expect.append((PROMPTS[lo + i], out.responses[i, :n].tolist(), out.logprobs[i, :n]))
    results = run_ranks(_worker, 4, timeout=180)
    for samples, released, timings in results:
        assert released, "the generation copy outlived the rollout"
        assert timings["time_reshard"] > 0 and timings["time_generate"] > 0
        assert len(samples) == len(PROMPTS)
        for (prompt, resp, lp), (e_prompt, e_resp, e_lp) in zip(samples, expect, strict=True):
            assert prompt == e_prompt
            assert resp == e_resp
            assert (torch.tensor(lp) - e_lp).abs().max() <= 1e-5
    assert any(len(s[1]) > 0 for s in results[0][0])
