"""Functions run on spawned gloo ranks by the conversion tests (kept free of transformers, so a
rank imports only torch and megarlhf)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megarlhf.algos.ranking import last_token_scores
from megarlhf.checkpoint.model_shards import load_model_shard, read_meta
from megarlhf.config import GenerationConfig
from megarlhf.model.generation import generate
from megarlhf.model.gpt import GPTModel
from megarlhf.parallel.state import ParallelState, build_parallel_state


def load_stage(ckpt, ps: ParallelState, strict_layout: bool) -> GPTModel:
    """This rank's stage of the model in `ckpt`, loaded for layout `ps` (re-sharded if needed)."""
    cfg = read_meta(ckpt).model
    model = GPTModel(cfg, ps)
    state = load_model_shard(
        ckpt,
        tp=ps.tp_size,
        tp_rank=ps.tp_rank,
        pp=ps.pp_size,
        pp_rank=ps.pp_rank,
        strict_layout=strict_layout,
    )
    model.load_state_dict(state, strict=True)
    return model.eval()


def full_logits(model: GPTModel, shard: torch.Tensor) -> torch.Tensor:
    """[b, s, vocab] logits from this rank's vocab shard (all-gather over TP, padding dropped)."""
    ps = model.ps
    if ps.tp_size > 1:
        parts = [torch.empty_like(shard) for _ in range(ps.tp_size)]
        dist.all_gather(parts, shard.contiguous(), group=ps.tp_group)
        shard = torch.cat(parts, dim=-1)
    return shard[..., : model.cfg.vocab_size]


@torch.no_grad()
def pipeline_logits(model: GPTModel, ids: torch.Tensor) -> torch.Tensor | None:
    """Forward through the pipeline stage by stage (hidden states sent with dist.send/recv).

    Returns the full logits on the last stage, None elsewhere.
    """
    ps = model.ps
    if ps.is_first_stage:
        out = model(ids)
    else:
        hidden = torch.empty(*ids.shape, model.cfg.hidden_size, dtype=model.cfg.torch_dtype)
        dist.recv(hidden, src=ps.prev_rank)
        out = model(hidden_states=hidden)
    if not ps.is_last_stage:
        dist.send(out.contiguous(), dst=ps.next_rank)
        return None
    return full_logits(model, out)


def logits_and_greedy(rank, world_size, cases, layouts, ids, new_tokens):
    """For each model: logits at every layout (its own checkpoint, strict), and greedy tokens at
    PP=1, TP=1 and 2, from every layout's checkpoint (re-sharded while loading).

    Args:
        cases: {name: {(tp, pp): checkpoint dir}}.
        layouts: [(tp, pp)] (tp * pp divides world_size).
        ids: [b, s] prompt token ids.
    Returns:
        {(name, "logits", tp, pp): [b, s, vocab]} and {(name, "greedy", tp, src_tp, src_pp):
        [b, new_tokens]}, from data-parallel replica 0's reporting rank only.
    """
    torch.manual_seed(0)
    states = {layout: build_parallel_state(*layout) for layout in layouts}
    gen = GenerationConfig(max_new_tokens=new_tokens, temperature=0.0)
    out = {}
    for name, ckpts in cases.items():
        for layout in layouts:
            ps = states[layout]
            logits = pipeline_logits(load_stage(ckpts[layout], ps, strict_layout=True), ids)
            if logits is not None and ps.tp_rank == 0 and ps.dp_rank == 0:
                out[(name, "logits", *layout)] = logits
        for tp in (1, 2):
            ps = states[(tp, 1)]
            for src in layouts:
                model = load_stage(ckpts[src], ps, strict_layout=False)
                res = generate(model, ids, torch.ones_like(ids), gen, eos_id=None, pad_id=0)
                if ps.tp_rank == 0 and ps.dp_rank == 0:
                    out[(name, "greedy", tp, *src)] = res.responses
    return out


def smollm2_tp(rank, world_size, ckpt, ids, new_tokens, eos_id):
    """SmolLM2 at TP=world_size (PP=1): full logits of `ids` and greedy tokens after it."""
    ps = build_parallel_state(world_size, 1)
    model = load_stage(ckpt, ps, strict_layout=False)
    with torch.no_grad():
        logits = full_logits(model, model(ids))
    gen = GenerationConfig(max_new_tokens=new_tokens, temperature=0.0)
    res = generate(model, ids, torch.ones_like(ids), gen, eos_id=eos_id, pad_id=eos_id)
    return (logits, res.responses) if rank == 0 else None


@torch.no_grad()
def pipeline_scores(model: GPTModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
    """Scalar-head scores [b, n] at each row's last real token, through the pipeline stage by
    stage (None except on the last stage). The head already sums its TP partial scores."""
    ps = model.ps
    if ps.is_first_stage:
        out = model(ids, attention_mask=mask)
    else:
        hidden = torch.empty(*ids.shape, model.cfg.hidden_size, dtype=model.cfg.torch_dtype)
        dist.recv(hidden, src=ps.prev_rank)
        out = model(hidden_states=hidden, attention_mask=mask)
    if not ps.is_last_stage:
        dist.send(out.contiguous(), dst=ps.next_rank)
        return None
    return last_token_scores(out, mask)


def scores_at_layouts(rank, world_size, cases, layouts, batches):
    """Reward-model scores of every (ids, mask) batch at every layout, from each layout's own
    checkpoint (strict).

    Args:
        cases: {name: {(tp, pp): checkpoint dir}}.
        layouts: [(tp, pp)] with tp * pp == world_size.
        batches: {padding side: (ids [b, s], mask [b, s])}.
    Returns:
        {(name, tp, pp, side): [b, n]} from the reporting rank (last stage, TP rank 0).
    """
    out = {}
    for layout in layouts:
        ps = build_parallel_state(*layout)
        for name, ckpts in cases.items():
            model = load_stage(ckpts[layout], ps, strict_layout=True)
            for side, (ids, mask) in batches.items():
                scores = pipeline_scores(model, ids, mask)
                if scores is not None and ps.tp_rank == 0:
                    out[(name, *layout, side)] = scores
    return out
