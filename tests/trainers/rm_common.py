"""Helpers for the reward-model tests: an independent pair-by-pair loss, LM checkpoints to start
from, plain-torch rewards."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from tests.trainers.common import ROOT

RM_TINY = str(ROOT / "configs" / "rm_tiny.yaml")
DEMOS = str(ROOT / "data" / "sft_tiny.jsonl")


def pairwise_loss(rewards: torch.Tensor, ranks: list[int], sizes: list[int]) -> torch.Tensor:
    """Every pair of every prompt, weight 1/C(K,2), mean over prompts (the InstructGPT loss
    written out pair by pair, independently of megarlhf.algos.ranking)."""
    total, start = rewards.new_zeros(()), 0
    for k in sizes:
        prompt = rewards.new_zeros(())
        for i in range(start, start + k):
            for j in range(i + 1, start + k):
                w, lose = (i, j) if ranks[i] < ranks[j] else (j, i)
                prompt = prompt - F.logsigmoid(rewards[w] - rewards[lose])
        total = total + prompt / math.comb(k, 2)
        start += k
    return total / len(sizes)


def last_token_rewards(model, seqs, chunk: int = 64) -> torch.Tensor:
    """Rewards at each sequence's last token (right-padded chunks, position len - 1), float64."""
    out = []
    with torch.no_grad():
        for i in range(0, len(seqs), chunk):
            part = [list(s) for s in seqs[i : i + chunk]]
            width = max(map(len, part))
            ids = torch.tensor([s + [0] * (width - len(s)) for s in part])
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in part])
            scores = model(ids, attention_mask=mask)[..., 0]
            out.append(scores[torch.arange(len(part)), torch.tensor(list(map(len, part))) - 1])
    return torch.cat(out).double()


def save_lm_checkpoint(path: Path, cfg, seed: int) -> dict[str, torch.Tensor]:
    """A language-model checkpoint (the format an SFT run or tools/convert_hf.py writes, weights
    only) at TP=1, PP=1; returns its weights."""
    from megarlhf.checkpoint.model_shards import save_model_shard
    from megarlhf.model.gpt import GPTModel
    from megarlhf.parallel.state import single_process_state

    assert cfg.head == "lm"
    model = GPTModel(cfg, single_process_state(), seed=seed)
    with torch.no_grad():  # move away from any initialization a run would draw itself
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    save_model_shard(path, weights, cfg, tp=1, tp_rank=0, pp=1, pp_rank=0)
    return weights


def demo_reward_mean(model, seq_len: int = 128) -> float:
    """Mean reward of the shipped demonstrations (plain torch, one sequence at a time)."""
    from megarlhf.data.sft import load_sft_dataset
    from megarlhf.data.tokenizer import load_tokenizer

    tok = load_tokenizer(ROOT / "data" / "tokenizer")
    data = load_sft_dataset([DEMOS], tok, seq_len, "auto")
    return last_token_rewards(model.eval(), [s.input_ids for s in data.samples]).mean().item()
