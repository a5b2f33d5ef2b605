"""Measurements on checkpoints, in one process (TP = PP = 1): samples, response log-probs,
perplexity and reward-model scores. Used by the demo's evaluation; any checkpoint layout loads
(weights are re-sharded to TP = 1 on load)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from megarlhf.algos.ranking import last_token_scores
from megarlhf.checkpoint.model_shards import load_model_shard, read_meta, resolve_checkpoint_dir
from megarlhf.config import GenerationConfig
from megarlhf.model.generation import generate, left_pad, right_pad
from megarlhf.model.gpt import GPTModel
from megarlhf.parallel.state import single_process_state


def load_model(path: str) -> GPTModel:
    """A checkpoint (a step directory or a run directory: its latest step) in eval mode."""
    ckpt = resolve_checkpoint_dir(path)
    model = GPTModel(read_meta(ckpt).model, single_process_state(), skip_init=True)
    model.load_state_dict(load_model_shard(ckpt, tp=1, tp_rank=0, pp=1, pp_rank=0), strict=True)
    return model.eval()


@dataclass
class Completion:
    """A sampled response: token ids (through EOS when it came) and their log-probs."""

    tokens: list[int]
    logprobs: list[float]


@torch.no_grad()
def sample(
    model: GPTModel,
    prompts: list[list[int]],
    gen: GenerationConfig,
    eos_id: int,
    pad_id: int,
    batch_size: int = 64,
) -> list[Completion]:
    """One completion per prompt, in order; batch i is seeded by (gen.seed, i)."""
    out = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = left_pad(prompts[start : start + batch_size], pad_id)
        g = torch.Generator().manual_seed(gen.seed * 100003 + start)
        res = generate(model, ids, mask, gen, eos_id, pad_id, generator=g)
        for row in range(ids.shape[0]):
            n = int(res.response_mask[row].sum())
            out.append(Completion(res.responses[row, :n].tolist(), res.logprobs[row, :n].tolist()))
    return out


@torch.no_grad()
def response_logprobs(
    model: GPTModel,
    prompts: list[list[int]],
    responses: list[list[int]],
    batch_size: int = 64,
    temperature: float = 1.0,
) -> list[np.ndarray]:
    """log p(response token | prompt, earlier response tokens) for each pair (fp32 math)."""
    out = []
    for start in range(0, len(prompts), batch_size):
        ps, rs = prompts[start : start + batch_size], responses[start : start + batch_size]
        ids, mask = right_pad([p + r for p, r in zip(ps, rs, strict=True)], 0)
        logp = torch.log_softmax(model(ids, attention_mask=mask).float() / temperature, -1)
        for i, (p, r) in enumerate(zip(ps, rs, strict=True)):
            pos = torch.arange(len(p) - 1, len(p) + len(r) - 1)
            out.append(logp[i, pos, torch.tensor(r, dtype=torch.long)].numpy())
    return out


def perplexity(model: GPTModel, rows: list[list[int]], batch_size: int = 64) -> float:
    """exp(mean next-token NLL) over every position after the first of each row."""
    firsts = [r[:1] for r in rows]
    lps = response_logprobs(model, firsts, [r[1:] for r in rows], batch_size)
    total = sum(float(x.sum()) for x in lps)
    count = sum(len(x) for x in lps)
    return float(np.exp(-total / count))


@torch.no_grad()
def reward_scores(
    model: GPTModel, prompts: list[list[int]], responses: list[list[int]], batch_size: int = 64
) -> np.ndarray:
    """Scalar-head score at the last token of each prompt + response (the PPO reward)."""
    out = []
    for start in range(0, len(prompts), batch_size):
        ps, rs = prompts[start : start + batch_size], responses[start : start + batch_size]
        ids, mask = right_pad([p + r for p, r in zip(ps, rs, strict=True)], 0)
        scores = last_token_scores(model(ids, attention_mask=mask)[..., 0].float(), mask)
        out.append(scores.numpy())
    return np.concatenate(out).astype(np.float64)
