"""Incremental decoding with a KV cache under tensor parallelism.

Prefill runs the left-padded prompts once; then one token per step. Every TP rank all-gathers the
last position's vocab shards, and all ranks sample from the same seeded generator, so they pick the
same token without a broadcast (and TP=N picks what TP=1 picks).

Log-prob semantics: the returned log-probs are those of the *temperature-scaled* distribution,
log softmax(logits / T), before top-k/top-p truncation; greedy decoding (T = 0) reports
log softmax(logits). PPO recomputes exactly this quantity in training, so the two agree.
Tokens after a row's EOS are padding, masked out (mask False, log-prob 0).

`vocab_limit` keeps sampling to the ids a tokenizer has when the model's vocabulary is larger (a
model padded to a round size, or trained with a bigger tokenizer): the gathered logits are cut to
[:, :vocab_limit] on every rank alike, so ids >= vocab_limit are never sampled, the log-probs are
those of the distribution over ids < vocab_limit, and TP=N still picks what TP=1 picks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megarlhf.config import GenerationConfig
from megarlhf.model.kv_cache import KVCache
from megarlhf.parallel.mappings import gather_from_tensor_parallel_region


@dataclass
class GenerationOutput:
    """Result of `generate`.

    Attributes:
        sequences: [b, p + n] prompt (left-padded, as given) followed by the response.
        attention_mask: [b, p + n] 1 for prompt and response tokens, 0 for padding.
        responses: [b, n] generated tokens, `pad_id` after EOS.
        response_mask: [b, n] True for generated tokens up to and including EOS.
        logprobs: [b, n] fp32 log-probs of the generated tokens (0 where masked).
    """

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    responses: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor


def _pad(rows, pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, cols] = torch.tensor(r, dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists as a left-padded batch: (ids [b, longest], mask [b, longest], 1 = token)."""
    return _pad(prompts, pad_id, left=True)


def right_pad(rows, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists as a right-padded batch: (ids [b, longest], mask [b, longest], 1 = token)."""
    return _pad(rows, pad_id, left=False)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask [b, v] logits outside top-k and outside the top-p nucleus to -inf (new tensor)."""
    out = logits
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass strictly before it already reaches top_p (keeps >= 1 token).
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def sample_tokens(
    logits: torch.Tensor, gen: GenerationConfig, generator: torch.Generator | None = None,
    u: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Pick one token per row of full-vocabulary logits [b, v].

    Sampling uses inverse-CDF with one uniform draw per row (`u` [b], else drawn from
    `generator`; drawn even when greedy, so the stream is the same for every setting), which makes
    the choice deterministic given the logits.

    Returns:
        (tokens [b] long, logprobs [b] fp32 under the temperature-scaled distribution).
    """
    logits = logits.float()
    if u is None:
        u = torch.rand(logits.shape[0], generator=generator)
    u = u.to(logits.device)
    if gen.temperature == 0.0:
        tokens = logits.argmax(-1)
        logp = torch.log_softmax(logits, -1)
    else:
        scaled = logits / gen.temperature
        logp = torch.log_softmax(scaled, -1)
        probs = filter_logits(scaled, gen.top_k, gen.top_p).softmax(-1)
        cdf = probs.cumsum(-1)
        target = (u * cdf[:, -1]).unsqueeze(-1)
        tokens = torch.searchsorted(cdf, target).squeeze(-1).clamp_max(logits.shape[-1] - 1)
        # Never land on a zero-probability token through cumsum rounding.
        bad = probs.gather(-1, tokens[:, None]).squeeze(-1) == 0
        if bad.any():
            tokens = torch.where(bad, probs.argmax(-1), tokens)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


def _check_request(cfg, prompt_len: int, new_tokens: int, vocab_limit: int | None) -> int:
    """Refuse a sequence longer than the model's context or a limit outside its vocabulary;
    return the number of ids to sample from."""
    if prompt_len + new_tokens > cfg.max_seq_len:
        raise ValueError(
            f"prompt length {prompt_len} + max_new_tokens {new_tokens} exceeds model.max_seq_len "
            f"{cfg.max_seq_len}"
        )
    limit = cfg.vocab_size if vocab_limit is None else vocab_limit
    if not 1 <= limit <= cfg.vocab_size:
        raise ValueError(
            f"vocab_limit {vocab_limit} is outside 1..model.vocab_size ({cfg.vocab_size}): the "
            "model has no logits for ids beyond its vocabulary"
        )
    return limit


@torch.no_grad()
def generate(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    gen: GenerationConfig,
    eos_id: int | None,
    pad_id: int,
    generator: torch.Generator | None = None,
    vocab_limit: int | None = None,
) -> GenerationOutput:
    """Sample responses for a batch of left-padded prompts.

    Rows that emitted EOS stop costing compute: once a quarter of the rows still computed have
    finished, the batch is compacted (their KV-cache rows dropped). Every step still draws one
    uniform per original row, so the tokens are the same as without compaction.

    Args:
        model: a GPTModel holding all layers (pipeline size 1).
        prompt_ids: [b, p] token ids, left-padded.
        prompt_mask: [b, p] 1 for real tokens.
        gen: sampling settings (max_new_tokens, temperature, top_k, top_p, seed).
        eos_id: a row stops after emitting it (None: never stops early).
        pad_id: filler after EOS.
        generator: CPU generator for the uniform draws; default seeded from gen.seed. It must
            be seeded identically on every rank of a TP group.
        vocab_limit: sample only ids < vocab_limit (the tokenizer's vocabulary size); None:
            every id of model.vocab_size.

    Raises:
        ValueError: a model without every layer, a sequence longer than model.max_seq_len, or a
            vocab_limit outside 1..model.vocab_size.
    """
    if not (model.pre_process and model.post_process):
        raise ValueError("generate() needs a model holding every layer (pipeline size 1)")
    if generator is None:
        generator = torch.Generator().manual_seed(gen.seed)
    b, p = prompt_ids.shape
    limit = _check_request(model.cfg, p, gen.max_new_tokens, vocab_limit)
    was_training = model.training
    model.eval()
    try:
        state = _Decode(model, prompt_ids, prompt_mask, gen, eos_id, pad_id, generator, limit)
        state.run()
    finally:
        model.train(was_training)
    sequences = torch.cat([prompt_ids, state.responses], dim=1)
    mask = torch.cat([prompt_mask.long(), state.response_mask.long()], dim=1)
    return GenerationOutput(sequences, mask, state.responses, state.response_mask, state.logprobs)


class _Decode:
    """The decoding loop's state: outputs over all rows, the KV cache over the rows still
    computed (`active`, indices into the batch)."""

    def __init__(self, model, prompt_ids, prompt_mask, gen, eos_id, pad_id, generator, limit):
        self.model, self.gen, self.eos_id, self.pad_id = model, gen, eos_id, pad_id
        self.limit = limit
        self.generator, self.prompt_ids, self.prompt_mask = generator, prompt_ids, prompt_mask
        b, p = prompt_ids.shape
        n, device = gen.max_new_tokens, prompt_ids.device
        # The cache holds keys in the dtype the model computes in (bf16 under DeepSpeed's bf16).
        dtype = next(model.parameters()).dtype
        layer = model.layers[str(model.layer_start)].attention
        self.cache = KVCache(
            model.num_local_layers, b, layer.local_kv_heads, p + n, model.cfg.head_dim, dtype,
            device,
        )  # fmt: skip
        self.responses = torch.full((b, n), pad_id, dtype=torch.long, device=device)
        self.logprobs = torch.zeros(b, n, dtype=torch.float32, device=device)
        self.response_mask = torch.zeros(b, n, dtype=torch.bool, device=device)
        self.alive = torch.ones(b, dtype=torch.bool, device=device)
        self.active = torch.arange(b, device=device)
        self.next_pos = prompt_mask.long().sum(-1)  # position of the first response token

    def run(self) -> None:
        model, n = self.model, self.gen.max_new_tokens
        logits = model(
            self.prompt_ids, attention_mask=self.prompt_mask, kv_cache=self.cache, last_only=True
        )[:, -1]
        for t in range(n):
            self.sample(logits, t)
            if t == n - 1 or not self.alive.any():
                break
            self.maybe_compact()
            act = self.active
            logits = model(  # no attention_mask: every new slot is a real key
                self.responses[act, t : t + 1],
                position_ids=(self.next_pos[act] + t)[:, None],
                kv_cache=self.cache,
            )[:, -1]
        del self.cache

    def sample(self, logits: torch.Tensor, t: int) -> None:
        """Token t of the active rows from their logits [active, v / tp]."""
        ps, act = self.model.ps, self.active
        # [active, padded vocab / tp] shards -> [active, padded vocab] -> [active, limit]: no
        # padding row and no id the tokenizer lacks can be drawn.
        full = gather_from_tensor_parallel_region(logits, ps.tp_group)[:, : self.limit]
        u = torch.rand(self.responses.shape[0], generator=self.generator)  # one per row, always
        tok, lp = sample_tokens(full, self.gen, u=u[act.cpu()])
        alive = self.alive[act]
        self.responses[act, t] = torch.where(alive, tok, torch.full_like(tok, self.pad_id))
        self.logprobs[act, t] = torch.where(alive, lp, torch.zeros_like(lp))
        self.response_mask[act, t] = alive
        if self.eos_id is not None:
            self.alive[act] = alive & (tok != self.eos_id)

    def maybe_compact(self) -> None:
        """Drop finished rows from the computed batch once they are a quarter of it."""
        keep = self.alive[self.active]
        if int(keep.sum()) > 0.75 * len(self.active):
            return
        idx = keep.nonzero().squeeze(-1)
        self.cache.select_rows(idx)
        self.active = self.active[idx]
