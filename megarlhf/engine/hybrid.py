"""The PPO hybrid engine: generate rollouts in a generation layout from an actor trained in another.

The actor trains in its layout (tp_t, pp_t, dp_t, ZeRO 0-3 through DeepSpeed). For each rollout:

  1. a generation copy `GPTModel(cfg, gen_ps, skip_init=True)` is built (tp_g, pipeline size 1,
     dp_g = world / tp_g) and filled in memory by `reshard_weights` (timed: `time_reshard`);
  2. each generation-DP rank generates a contiguous slice of the global prompt batch with the KV
     cache, seeded by (seed, step, generation-DP rank), so every TP rank of a group agrees;
  3. the copy and its cache are released (`del`, `gc.collect()`), so training memory is back to
     the actor alone;
  4. the samples are redistributed: every rank all-gathers the per-sample records of the
     generation groups' TP rank 0 (`all_gather_object` over the world) and then holds the whole
     global batch in prompt order; the trainer cuts its own training-DP slice.

Simplifications, stated: step 4 moves Python lists through the object store (fine for the batch
sizes of RLHF rollouts, where token ids are tiny next to the weights), and every rank receives the
whole batch. A ZeRO-3 actor is gathered whole for the copy (`GatheredParameters` over all its
parameters at once: simple, but it peaks at a full unpartitioned replica on top of the copy).
With dp_g == 1 the generated batch does not depend on the training layout, which is what the
layout-equality tests rely on.

When the generation layout is the training layout (pipeline size 1, the same TP size, so the same
groups, and no ZeRO-3 partitions), steps 1 and 3 are skipped: the actor's own module generates
(in eval mode, restored afterwards). The copy would hold the same tensors in the same layout, so
the tokens are the same; it only cost a model's worth of memory and a copy per rollout.

LoRA (model.lora.rank > 0): the generation copy is the merged model, without adapters: its
weights are W + (alpha / r) B A, merged while re-sharding (`reshard_weights`), so generation pays
no adapter matmuls. Generating in place, the actor's forward applies its adapters as in training
(no merge and unmerge around the rollout: in bf16 that would not give W back, and the frozen base,
which is also the reference, would drift; `megarlhf/model/lora.py` has the numbers).
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megarlhf.config import GenerationConfig
from megarlhf.engine.reshard import reshard_weights
from megarlhf.model.generation import generate, left_pad
from megarlhf.model.gpt import GPTModel
from megarlhf.model.lora import base_config
from megarlhf.parallel.state import ParallelState


@dataclass
class Sample:
    """One generated answer, unpadded.

    Attributes:
        prompt: prompt token ids.
        response: generated ids up to and including EOS (when it came).
        logprobs: generation log-probs of `response` (temperature-scaled distribution).
    """

    prompt: list[int]
    response: list[int]
    logprobs: list[float]


def slice_bounds(n: int, rank: int, size: int) -> tuple[int, int]:
    """[start, end) of `rank`'s contiguous share of n items over `size` ranks (sizes +- 1)."""
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def rollout_seed(seed: int, step: int, gen_dp_rank: int) -> int:
    """Sampling seed of generation-DP rank `gen_dp_rank` at rollout `step` (equal over its TP)."""
    return (seed * 1_000_003 + step * 7919 + gen_dp_rank) % (2**63)


class HybridEngine:
    """Rollout side of PPO: take the actor's weights, generate, release memory.

    Args:
        actor: this rank's actor stage in the training layout (a GPTModel; DeepSpeed's
            `engine.module`), read only.
        gen_ps: the generation layout over the same world (pipeline size 1).
        gen_cfg: sampling settings.
        eos_id: stop token (None: never stops early).
        pad_id: filler token.
        vocab_limit: sample only ids below it (the tokenizer's vocabulary size; None: all).
    """

    def __init__(
        self,
        actor: GPTModel,
        gen_ps: ParallelState,
        gen_cfg: GenerationConfig,
        eos_id: int | None,
        pad_id: int,
        vocab_limit: int | None = None,
    ):
        if gen_ps.pp_size != 1:
            raise ValueError(f"the generation layout needs pipeline size 1, got {gen_ps.pp_size}")
        self.actor, self.gen_ps, self.gen_cfg = actor, gen_ps, gen_cfg
        self.eos_id, self.pad_id, self.vocab_limit = eos_id, pad_id, vocab_limit
        self.timings: dict[str, float] = {}

    def seed_for(self, step: int) -> int:
        """Sampling seed of this rank's generation group at rollout `step`."""
        return rollout_seed(self.gen_cfg.seed, step, self.gen_ps.dp_rank)

    def generates_in_place(self) -> bool:
        """Whether the actor itself can generate: the generation layout is its training layout."""
        a, g = self.actor.ps, self.gen_ps
        same = (a.pp_size, a.tp_size, a.tp_rank, a.dp_rank) == (1, g.tp_size, g.tp_rank, g.dp_rank)
        return same and not any(hasattr(p, "ds_id") for p in self.actor.parameters())

    def build_generation_model(self) -> GPTModel:
        """A generation-layout copy of the actor's current weights, adapters merged (collective)."""
        model = GPTModel(base_config(self.actor.cfg), self.gen_ps, skip_init=True)
        params = list(self.actor.parameters())
        if any(hasattr(p, "ds_id") for p in params):
            # ZeRO-3: gather the actor's partitions (collective over its DP group) for the copy.
            import deepspeed

            with deepspeed.zero.GatheredParameters(params):
                model.to(params[0].dtype)
                reshard_weights(self.actor, model)
        else:
            model.to(params[0].dtype)
            reshard_weights(self.actor, model)
        model.eval()
        return model

    def rollout(self, prompts: list[list[int]], step: int) -> list[Sample]:
        """Generate answers to the global prompt batch; every rank returns all samples in order.

        Collective over the world. Sets `self.timings`: time_reshard (build + re-shard the copy;
        ~0 when generating in place), time_generate (generation, release and redistribution).
        """
        t0 = time.perf_counter()
        in_place = self.generates_in_place()
        model = self.actor if in_place else self.build_generation_model()
        t1 = time.perf_counter()
        start, end = slice_bounds(len(prompts), self.gen_ps.dp_rank, self.gen_ps.dp_size)
        mine: list[Sample] = []
        if end > start:
            ids, mask = left_pad(prompts[start:end], self.pad_id)
            device = next(model.parameters()).device
            ids, mask = ids.to(device), mask.to(device)
            gen = torch.Generator().manual_seed(self.seed_for(step))
            out = generate(
                model, ids, mask, self.gen_cfg, self.eos_id, self.pad_id, gen, self.vocab_limit
            )
            for i in range(end - start):
                n = int(out.response_mask[i].sum().cpu())
                mine.append(
                    Sample(
                        prompts[start + i],
                        out.responses[i, :n].cpu().tolist(),
                        out.logprobs[i, :n].cpu().tolist(),
                    )
                )
            del out
        del model
        if not in_place:  # a full collection costs ~0.2 s with a large heap: only for the copy
            gc.collect()
        samples = self._gather(mine)
        self.timings = {"time_reshard": t1 - t0, "time_generate": time.perf_counter() - t1}
        return samples

    def _gather(self, mine: list[Sample]) -> list[Sample]:
        """Every generation group's samples (from its TP rank 0), in generation-DP order."""
        if not (dist.is_available() and dist.is_initialized()) or self.gen_ps.world_size == 1:
            return mine
        box: list = [None] * self.gen_ps.world_size
        dist.all_gather_object(box, mine if self.gen_ps.tp_rank == 0 else None)
        return [s for part in box if part is not None for s in part]
