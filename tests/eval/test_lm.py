"""Checkpoint measurements against direct computations on the same model."""

import math

import torch
import torch.nn.functional as F

from megarlhf.config import GenerationConfig, ModelConfig
from megarlhf.eval.lm import perplexity, response_logprobs, reward_scores, sample
from megarlhf.model.gpt import GPTModel
from megarlhf.parallel.state import single_process_state


def _model(head="lm"):
    cfg = ModelConfig(
        family="gpt2", vocab_size=50, hidden_size=32, num_layers=2, num_heads=4,
        max_seq_len=32, make_vocab_size_divisible_by=8, head=head,
    )  # fmt: skip
    return GPTModel(cfg, single_process_state(), seed=3).eval()


ROWS = [[1, 5, 7, 9, 2], [1, 4, 2], [1, 8, 8, 8, 8, 8, 3]]


def test_perplexity_equals_per_row_cross_entropy():
    m = _model()
    nll, count = 0.0, 0
    with torch.no_grad():
        for r in ROWS:
            ids = torch.tensor([r])
            logits = m(ids)[0, :-1, :50]
            nll += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += len(r) - 1
    assert math.isclose(perplexity(m, ROWS, batch_size=2), math.exp(nll / count), rel_tol=1e-5)


def test_response_logprobs_equal_generation_logprobs():
    m = _model()
    prompts = [[1, 5, 7], [1, 4], [1, 9, 9, 9]]
    gen = GenerationConfig(max_new_tokens=6, temperature=1.0, seed=11)
    comps = sample(m, prompts, gen, eos_id=2, pad_id=0, batch_size=2)
    again = response_logprobs(m, prompts, [c.tokens for c in comps], batch_size=3)
    for c, lp in zip(comps, again, strict=True):
        assert len(c.tokens) == len(lp) >= 1
        assert torch.allclose(torch.tensor(c.logprobs), torch.tensor(lp), atol=1e-5)


def test_reward_scores_read_the_last_token():
    m = _model(head="scalar")
    prompts, responses = [[1, 5], [1, 4, 4, 4]], [[7, 2], [3]]
    got = reward_scores(m, prompts, responses)
    with torch.no_grad():
        want = [
            float(m(torch.tensor([p + r]))[0, -1, 0])
            for p, r in zip(prompts, responses, strict=True)
        ]
    assert torch.allclose(torch.tensor(got, dtype=torch.float32), torch.tensor(want), atol=1e-5)
