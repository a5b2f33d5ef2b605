"""PPO experience: the typed batch the update reads (`Experience`), and the experience maker that
fills it from rollout samples with forward-only passes of the actor, reference, critic and reward.

The maker's stages, in order (veRL's names): collate the samples, `compute_old_log_prob`,
`compute_ref_log_prob`, `compute_values`, `compute_scores`, `compute_score_penalties` (missing
EOS, overlong), `compute_rewards`, `compute_advantages`, `compute_is_weights` (the rollout
importance-sampling correction). Each is one method; the RL math they call is in
`megarlhf.algos`. Forward passes run in the training layout through the pipeline schedule; the
last stage's outputs are broadcast over the pipeline, so every rank holds the whole experience of
its DP slice.

Log-prob semantics: `logprobs_from_logits(..., temperature=T)` with the sampling temperature T
(1 when sampling greedily), before top-k / top-p: exactly what generation reports.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from megarlhf.algos.advantages import ADVANTAGE_ESTIMATORS
from megarlhf.algos.dp_stats import dp_gather_rows, dp_max, dp_named_sums, dp_whiten, my_rows
from megarlhf.algos.kl_controller import KLController
from megarlhf.algos.ppo import (
    ROLLOUT_CORRECTIONS,
    missing_eos_penalties,
    overlong_penalties,
    token_rewards,
)
from megarlhf.config.ppo import PPOAlgoConfig
from megarlhf.engine.hybrid import Sample
from megarlhf.engine.packing import IGNORE, PackedLayout, build_layout, row_groups
from megarlhf.kernels import logprobs_from_logits
from megarlhf.parallel.scalars import from_last_stage, world_max
from megarlhf.parallel.state import ParallelState
from megarlhf.utils.timing import StageTimer


@dataclass
class Experience:
    """One rollout batch of this training-DP rank: everything the PPO update reads.

    Shapes: b rows (this rank's slice of the rollout batch); P = `prompt_width` (prompts
    left-padded to the longest prompt of the whole rollout batch); T = response width
    (generation.max_new_tokens; responses right-padded). Response position t is the token
    input_ids[:, P + t], predicted by the model's output at position P + t - 1.

    Model inputs:
        input_ids       [b, P + T] long   prompt then response
        attention_mask  [b, P + T] long   1 on real prompt and response tokens
    Per response position:
        responses       [b, T] long   response ids, IGNORE (-100) after the response
        mask            [b, T] fp32   1 on response tokens
        gen_logprobs    [b, T] fp32   generation's log-probs (0 outside the mask)
        old_logprobs    [b, T] fp32   the actor's log-probs before the update (training layout)
        ref_logprobs    [b, T] fp32   the reference (SFT) model's
        values          [b, T] fp32   critic value of the state before each token (0: no critic)
        rewards         [b, T] fp32   -beta * KL per token, plus the RM score at the last token
        advantages      [b, T] fp32   from the advantage estimator (whitened when configured)
        returns         [b, T] fp32   the critic's targets
        is_weights      [b, T] fp32   rollout importance weights of the policy loss (None: off)
    Per row:
        scores          [b] fp32      reward of the whole response (RM score or reward_fn)
    The stage outputs are None until their stage has run.
    """

    prompt_width: int
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    responses: torch.Tensor
    mask: torch.Tensor
    gen_logprobs: torch.Tensor
    old_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    is_weights: torch.Tensor | None = None
    # Packed layouts of these rows, by (pack, pad_id) (see `layout`).
    layouts: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    @property
    def response_width(self) -> int:
        return self.mask.shape[1]

    def select(self, start: int, end: int) -> Experience:
        """Rows [start, end) (views, not copies; layouts are rebuilt for them)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name != "layouts":
                out[f.name] = v[start:end] if torch.is_tensor(v) else v
        return Experience(**out)

    def sequences(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each row's prompt and response token ids, unpadded."""
        p, valid = self.prompt_width, self.attention_mask.bool()
        prompts = [self.input_ids[i, :p][valid[i, :p]] for i in range(self.rows)]
        resp = [self.responses[i][self.mask[i].bool()] for i in range(self.rows)]
        return prompts, resp

    def layout(self, pack: bool, pad_id: int = 0) -> PackedLayout:
        """These rows in packed rows (pack) or one per row; built once per setting."""
        key = (pack, pad_id)
        if key not in self.layouts:
            prompts, resp = self.sequences()
            self.layouts[key] = build_layout(prompts, resp, self.response_width, pad_id, pack)
        return self.layouts[key]


def collate_samples(samples: list[Sample], width: int, n: int, pad_id: int) -> Experience:
    """The experience inputs of samples: prompts left-padded to `width`, responses right-padded
    to `n` (the rollout batch's own widths, so every DP slice has the same shapes)."""
    b = len(samples)
    ids = torch.full((b, width + n), pad_id, dtype=torch.long)
    attn = torch.zeros(b, width + n, dtype=torch.long)
    responses = torch.full((b, n), IGNORE, dtype=torch.long)
    gen_lp = torch.zeros(b, n, dtype=torch.float32)
    for i, s in enumerate(samples):
        p, r = len(s.prompt), len(s.response)
        ids[i, width - p : width] = torch.tensor(s.prompt)
        attn[i, width - p : width + r] = 1
        if r:
            ids[i, width : width + r] = torch.tensor(s.response)
            responses[i, :r] = torch.tensor(s.response)
            gen_lp[i, :r] = torch.tensor(s.logprobs)
    mask = (responses != IGNORE).float()
    return Experience(width, ids, attn, responses, mask, gen_lp)


# ----------------------------------------------------------------------------- micro-batches


@dataclass(frozen=True)
class MicroBatching:
    """How experience rows become the micro-batches of a forward or an optimizer step."""

    # Several sequences per row (first-fit decreasing); False: one sequence per row.
    pack: bool = True
    # Tokens (rows x row width) per micro-batch, at least one row; 0: `rows` rows.
    max_tokens: int = 0
    # Rows per micro-batch when max_tokens is 0.
    rows: int = 4
    # Filler token of the padding positions.
    pad_id: int = 0
    # Where the model runs: micro-batches are moved there (the experience stays on the CPU).
    device: str = "cpu"

    def budget(self, width: int) -> int:
        """Tokens per micro-batch for rows of `width`."""
        return self.max_tokens or self.rows * width


def micro_batches(
    exp: Experience,
    how: MicroBatching,
    ps: ParallelState,
    per_token: dict | None = None,
    outputs: str = "response",
) -> list[dict]:
    """The schedule's micro-batches of `exp`: model inputs of whole packed rows, and

    output_index  [N] flat positions (within the micro-batch) the head runs on: where a
                  response token is predicted ("response"), each sequence's last token
                  ("last"), or every position ("all": no index);
    packed        {"labels", and every `per_token` [b, T] tensor} at those positions, [N];
    out_index     [N] the same positions in the whole layout's flat [R * width];
    filler        True for the padding micro-batches that equalize the count over DP (one
                  row of padding, nothing predicted).
    """
    layout = exp.layout(how.pack, how.pad_id)
    groups = row_groups(layout.rows, layout.width, how.budget(layout.width))
    count = dp_max(len(groups), ps)
    flat = {"labels": layout.labels.reshape(-1)}
    for k, v in (per_token or {}).items():
        flat[k] = layout.to_packed(v, exp.mask).reshape(-1)
    wanted = _wanted_positions(layout, outputs)
    out = []
    for g in groups + [None] * (count - len(groups)):
        rows = range(g.start, g.stop) if g is not None else range(0, 1)
        lo, hi = rows.start * layout.width, rows.stop * layout.width
        idx = wanted[(wanted >= lo) & (wanted < hi)] if g is not None else wanted[:0]
        mb = {
            "input_ids": layout.input_ids[rows.start : rows.stop],
            "position_ids": layout.position_ids[rows.start : rows.stop],
            "filler": g is None,
            "out_index": idx,
        }
        if outputs != "all":
            mb["output_index"] = idx - lo
        mb["packed"] = {k: v[idx] for k, v in flat.items()}
        if not layout.one_per_row:
            mb["segment_ids"] = layout.segment_ids[rows.start : rows.stop]
        out.append(_to_device(mb, how.device))
    return out


def _to_device(mb: dict, device: str) -> dict:
    """The micro-batch's model inputs and per-token tensors on `device` (out_index stays: it
    addresses the experience's CPU tensors)."""
    if device == "cpu":
        return mb
    moved = {
        k: v.to(device) if torch.is_tensor(v) and k != "out_index" else v for k, v in mb.items()
    }
    moved["packed"] = {k: v.to(device) for k, v in mb["packed"].items()}
    return moved


def _wanted_positions(layout: PackedLayout, outputs: str) -> torch.Tensor:
    """Sorted flat positions whose outputs a pass reads."""
    if outputs == "response":
        return (layout.labels.reshape(-1) != IGNORE).nonzero().squeeze(-1)
    if outputs == "last":
        return layout.last_index.sort().values
    if outputs == "all":
        return torch.arange(layout.rows * layout.width)
    raise ValueError(f"outputs={outputs!r}: not response | last | all")


# ----------------------------------------------------------------------------- rewards


class RewardModelScorer:
    """Scores from a frozen scalar-head reward model: its output at each row's last real token."""

    def __init__(self, model):
        # A FrozenModel (placed on the compute device for its forwards).
        self.model = model

    def __call__(self, exp: Experience, samples: list[Sample], maker) -> torch.Tensor:
        with self.model.use() as model:
            scores = maker._forward(model, exp, scalar_output, outputs="last")
        return maker._layout(exp).at_last_token(scores)


class RewardFunctionScorer:
    """Scores from a rule: reward_fn(prompts, responses) -> one float per sample (toy rewards,
    tests)."""

    def __init__(self, fn: Callable[[list[list[int]], list[list[int]]], list[float]]):
        self.fn = fn

    def __call__(self, exp: Experience, samples: list[Sample], maker) -> torch.Tensor:
        values = self.fn([s.prompt for s in samples], [s.response for s in samples])
        return torch.tensor(values, dtype=torch.float32)


# ----------------------------------------------------------------------------- the maker


class ExperienceMaker:
    """Fills an `Experience` from rollout samples (see the module docstring for the stages).

    Args:
        actor: the trained actor (a DeepSpeedModel), in the training layout.
        reference: the frozen SFT model (a FrozenModel).
        critic: the trained critic, or None when the advantage estimator needs none.
        scorer: a reward scorer (`RewardModelScorer` or `RewardFunctionScorer`).
        kl_ctl: the KL coefficient controller (read, not updated, here).
        algo: the PPO algorithm section.
        ps: the training layout.
        fwd_bwd: the layout's forward-backward schedule.
        batching: how rows become micro-batches (packing, token budget).
        temperature: the sampling temperature of the log-probs.
        group_size: samples per prompt (consecutive rows).
        recompute_old_logprobs: old log-probs from a training-layout forward (else generation's).
        eos_id: the tokenizer's EOS (ppo.missing_eos_penalty looks for it in each response).
    """

    def __init__(
        self,
        *,
        actor,
        reference,
        critic,
        scorer: Callable,
        kl_ctl: KLController,
        algo: PPOAlgoConfig,
        ps: ParallelState,
        fwd_bwd: Callable,
        batching: MicroBatching,
        temperature: float,
        group_size: int,
        recompute_old_logprobs: bool = True,
        eos_id: int | None = None,
    ):
        self.actor, self.reference, self.critic, self.scorer = actor, reference, critic, scorer
        self.kl_ctl, self.algo, self.ps, self.fwd_bwd = kl_ctl, algo, ps, fwd_bwd
        self.batching, self.temperature = batching, temperature
        self.group_size, self.recompute_old_logprobs = group_size, recompute_old_logprobs
        self.estimator = ADVANTAGE_ESTIMATORS[algo.advantage_estimator]
        if algo.missing_eos_penalty > 0 and eos_id is None:
            raise ValueError("ppo.missing_eos_penalty needs the tokenizer's EOS id")
        self.eos_id = eos_id

    @torch.no_grad()
    def make(self, samples: list[Sample], width: int, n: int, pad_id: int, timer: StageTimer):
        """The experience of this DP rank's `samples`, and the rollout's metrics.

        Args:
            samples: this rank's slice of the rollout batch.
            width, n: prompt and response widths of the whole rollout batch.
            pad_id: filler token.
            timer: receives time_actor_forward, time_reference_forward, time_values,
                time_reward, time_advantages.
        """
        exp = collate_samples(samples, width, n, pad_id)
        with timer("time_actor_forward"):
            exp.old_logprobs, entropy = self.compute_old_log_prob(exp)
        with timer("time_reference_forward"):
            exp.ref_logprobs = self.compute_ref_log_prob(exp)
        with timer("time_values"):
            exp.values = self.compute_values(exp)
        with timer("time_reward"):
            exp.scores = self.compute_scores(exp, samples)
        with timer("time_advantages"):
            penalties = self.compute_score_penalties(exp)
            exp.rewards, kl, non_score = self.compute_rewards(exp, penalties)
            exp.advantages, exp.returns = self.compute_advantages(exp)
            exp.is_weights = self.compute_is_weights(exp)
        stats = self.rollout_stats(exp, kl, non_score, entropy)
        stats.update(self.option_stats(exp, penalties))
        return exp, stats

    # -- the stages -------------------------------------------------------------------------

    def compute_old_log_prob(self, exp: Experience) -> tuple[torch.Tensor, torch.Tensor]:
        """The actor's log-probs and entropies [b, T] of the sampled tokens, before the update
        (or generation's, with ppo.recompute_old_logprobs=false: entropy is then the one-sample
        estimate -log p)."""
        if not self.recompute_old_logprobs:
            return exp.gen_logprobs, -exp.gen_logprobs
        self.actor.train(False)
        both = self._forward(
            self.actor, exp, lambda out, mb: torch.stack(self._logprobs(out, mb, True), -1), (2,)
        )
        self.actor.train(True)
        both = self._layout(exp).from_flat(both, exp.mask)
        return both[..., 0], both[..., 1]

    def compute_ref_log_prob(self, exp: Experience) -> torch.Tensor:
        """The reference model's log-probs [b, T] of the sampled tokens."""
        with self.reference.use() as reference:
            logp = self._forward(reference, exp, self._logprobs)
        return self._layout(exp).from_flat(logp, exp.mask)

    def compute_values(self, exp: Experience) -> torch.Tensor:
        """Critic values [b, T] of the state before each response token (zeros without one)."""
        if self.critic is None:
            return torch.zeros(exp.rows, exp.response_width)
        self.critic.train(False)
        values = self._forward(self.critic, exp, scalar_output)
        self.critic.train(True)
        return self._layout(exp).from_flat(values, exp.mask)

    def compute_scores(self, exp: Experience, samples: list[Sample]) -> torch.Tensor:
        """Reward [b] of each whole response."""
        return self.scorer(exp, samples, self)

    def compute_score_penalties(self, exp: Experience) -> dict[str, torch.Tensor]:
        """The amounts [b] each response's score loses, by name: "missing_eos"
        (ppo.missing_eos_penalty) and "overlong" (ppo.overlong_buffer_len); only those on."""
        a, out = self.algo, {}
        if a.missing_eos_penalty > 0:
            has_eos = (exp.responses == self.eos_id).any(-1)
            out["missing_eos"] = missing_eos_penalties(has_eos, a.missing_eos_penalty)
        if a.overlong_buffer_len > 0:
            lengths = exp.mask.sum(-1)
            out["overlong"] = overlong_penalties(
                lengths, exp.response_width, a.overlong_buffer_len, a.overlong_penalty_factor
            )
        return out

    def compute_rewards(self, exp: Experience, penalties: dict | None = None):
        """Per-token rewards [b, T] (and the KL [b, T] and -beta * KL behind them). The score
        penalties [b] are subtracted from the scores first, then the scores are whitened over
        the whole rollout batch with ppo.whiten_rewards, then clipped (ppo.score_clip)."""
        a = self.algo
        scores = exp.scores
        for p in (penalties or {}).values():
            scores = scores - p
        scores = dp_whiten(scores, None, self.ps) if a.whiten_rewards else scores
        return token_rewards(
            scores,
            exp.old_logprobs,
            exp.ref_logprobs,
            exp.mask,
            self.kl_ctl.beta,
            a.kl_estimator,
            a.score_clip,
        )

    def compute_advantages(self, exp: Experience) -> tuple[torch.Tensor, torch.Tensor]:
        """Advantages and returns [b, T] by ppo.advantage_estimator; advantages whitened over
        the whole rollout batch with ppo.whiten_advantages."""
        est, a = self.estimator, self.algo
        inputs = (exp.rewards, exp.values, exp.mask)
        if est.whole_groups:  # a prompt's samples may sit on two DP ranks
            inputs = tuple(dp_gather_rows(t, self.ps) for t in inputs)
        adv, ret = est.fn(*inputs, gamma=a.gamma, lam=a.lam, group_size=self.group_size)
        if est.whole_groups:
            adv, ret = my_rows(adv, self.ps), my_rows(ret, self.ps)
        if a.whiten_advantages or est.always_whiten:
            adv = dp_whiten(adv, exp.mask, self.ps)
        return adv, ret

    def compute_is_weights(self, exp: Experience) -> torch.Tensor | None:
        """Rollout importance weights [b, T] of the policy loss by ppo.rollout_is (None: off),
        from the training-layout old log-probs against generation's."""
        a = self.algo
        if a.rollout_is == "none":
            return None
        fn = ROLLOUT_CORRECTIONS[a.rollout_is]
        return fn(exp.old_logprobs, exp.gen_logprobs, exp.mask, a.rollout_is_cap)

    # -- helpers ------------------------------------------------------------------------------

    def rollout_stats(self, exp: Experience, kl, non_score, entropy) -> dict:
        """Metrics of the whole rollout batch (every DP rank's rows)."""
        mask, r = exp.mask, exp.scores.double()
        err = (exp.returns - exp.values) * mask
        sums = dp_named_sums(
            {
                "r": float(r.sum()), "r2": float((r * r).sum()), "rows": float(r.numel()),
                "kl": float(kl.sum()), "non_score": float(non_score.sum()),
                "entropy": float((entropy * mask).sum()), "tokens": float(mask.sum()),
                "ret": float((exp.returns * mask).sum()),
                "ret2": float((exp.returns * exp.returns * mask).sum()),
                "err": float(err.sum()), "err2": float((err * err).sum()),
            },
            self.ps,
        )  # fmt: skip
        rows, toks = sums["rows"], max(sums["tokens"], 1)
        mean = sums["r"] / rows
        var_ret = sums["ret2"] / toks - (sums["ret"] / toks) ** 2
        var_err = sums["err2"] / toks - (sums["err"] / toks) ** 2
        gap = ((exp.gen_logprobs - exp.old_logprobs).abs() * mask).max() if mask.any() else 0.0
        explained = 1.0 - var_err / max(var_ret, 1e-12) if self.critic is not None else 0.0
        return {
            "reward_mean": mean,
            "reward_std": math.sqrt(max(sums["r2"] / rows - mean * mean, 0.0)),
            "kl": sums["kl"] / rows,
            "non_score_reward": sums["non_score"] / rows,
            "entropy": sums["entropy"] / toks,
            "explained_variance": explained,
            "response_length": sums["tokens"] / rows,
            "response_tokens": sums["tokens"],
            "logprob_mismatch": world_max(float(gap), self.ps),
        }

    def option_stats(self, exp: Experience, penalties: dict) -> dict:
        """Metrics of the options that are on, over the whole rollout batch: missing_eos_frac,
        overlong_penalty_mean (per response), is_weight_mean (per token), is_weight_max."""
        local = {"rows": float(exp.rows), "tokens": float(exp.mask.sum())}
        if "missing_eos" in penalties:
            local["missing_eos"] = float((penalties["missing_eos"] > 0).sum())
        if "overlong" in penalties:
            local["overlong"] = float(penalties["overlong"].double().sum())
        if exp.is_weights is not None:
            local["is_w"] = float(exp.is_weights.double().sum())
        if len(local) == 2:
            return {}
        sums = dp_named_sums(local, self.ps)
        out = {}
        if "missing_eos" in sums:
            out["missing_eos_frac"] = sums["missing_eos"] / max(sums["rows"], 1.0)
        if "overlong" in sums:
            out["overlong_penalty_mean"] = sums["overlong"] / max(sums["rows"], 1.0)
        if "is_w" in sums:
            out["is_weight_mean"] = sums["is_w"] / max(sums["tokens"], 1.0)
            top = exp.is_weights.max() if exp.is_weights.numel() else 0.0
            out["is_weight_max"] = world_max(float(top), self.ps)
        return out

    def _forward(self, model, exp: Experience, fn, trailing=(), outputs="response"):
        """Forward-only pass over `exp`'s packed micro-batches, the head run only where
        `outputs` says; fn(out, mb) -> [N, ...] per output position; the whole layout's
        [R * width, *trailing] (0 where nothing was read) on every stage."""
        mbs = micro_batches(exp, self.batching, self.ps, outputs=outputs)
        stats = self.fwd_bwd(
            model=model,
            micro_batches=mbs,
            loss_fn=lambda out, mb: (None, {"x": fn(out, mb)}),
            ps=self.ps,
            forward_only=True,
        )
        layout = self._layout(exp)
        full = None
        if stats:  # the last stage
            first = stats[0]["x"]
            full = first.new_zeros(layout.rows * layout.width, *first.shape[1:])
            full = full.cpu()
            for mb, st in zip(mbs, stats, strict=True):
                idx = mb["out_index"]
                full[idx] = st["x"].reshape(len(idx), *full.shape[1:]).cpu()
        return from_last_stage(full, (layout.rows * layout.width, *trailing), self.ps)

    def _layout(self, exp: Experience) -> PackedLayout:
        return exp.layout(self.batching.pack, self.batching.pad_id)

    def _logprobs(self, out: torch.Tensor, mb: dict, entropy: bool = False):
        return packed_logprobs(out, mb, self.ps, self.temperature, entropy)


def packed_logprobs(out, mb: dict, ps: ParallelState, temperature: float, entropy=False):
    """Log-probs [r, width] (and entropies) of the response tokens each position predicts (0
    elsewhere), from logits `out` [r, width, V / tp] of a packed micro-batch."""
    return logprobs_from_logits(
        out,
        mb["packed"]["labels"],
        tp_group=ps.tp_group,
        temperature=temperature,
        return_entropy=entropy,
        ignore_index=IGNORE,
    )


def scalar_output(out: torch.Tensor, mb: dict) -> torch.Tensor:
    """A scalar head's output 0 at every position, fp32 [r, width]."""
    return out[..., 0].float()
