"""Per-token log-probabilities of labels (and entropy, and KL to a reference policy) from
vocab-parallel logits, without materializing the log-softmax.

Logits `[..., V_local]` are rank r's contiguous vocabulary shard [r * V_local, (r + 1) * V_local)
of the TP group (the whole vocabulary when `tp_group` is None). With z = logits / temperature the
computation runs in stages, the same ones `logprobs_ref.py` writes out in plain torch:

  1. local pass, one read of the shard by a fused kernel: m_r = max z, s_r = sum exp(z - m_r),
     w_r = sum exp(z - m_r) * (z - m_r) (entropy only), zy_r = z[label] if the label is in this
     shard, else 0. The kernel folds the local max into the sum on the fly (online softmax), so the
     logits are read once instead of once for the max and once more for the sum.
  2. all-reduce MAX of m_r -> M.
  3. local rescale to M: s_r * exp(m_r - M), exp(m_r - M) * (w_r + (m_r - M) * s_r).
  4. one all-reduce SUM of the packed [3, N] (s, w, zy) (2 rows without entropy).
  Then lse = M + log s, logp = zy - lse, entropy = log s - w / s.

So a forward makes exactly two collectives (none without a group) and allocates O(N) floats, never
an fp32 copy of the logits or of the log-softmax. The backward needs no communication: each rank
recomputes p = exp(z - lse) on its shard from the saved logits (a reference, not a copy) and writes
d/dz = g_lp * ([v == y] - p) - g_ent * p * (log p + H), times 1 / temperature.

Padded vocabulary columns (filled with finfo(dtype).min, -inf after a temperature < 1) get
exactly zero probability and add exactly 0 to the entropy and the gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megarlhf.kernels._dispatch import select_backend
from megarlhf.kernels.kl import kl_penalty


def rows_view(logits: torch.Tensor) -> torch.Tensor:
    """View `[..., V]` logits as `[B, T, V]` with unit stride along V, without copying when the
    leading dims collapse into two strided dims (e.g. `logits[:, :-1]` of a contiguous tensor);
    otherwise a contiguous copy in the logits' own dtype."""
    V = logits.shape[-1]
    if logits.stride(-1) != 1 and V > 1:
        logits = logits.contiguous()
    dims = [(n, s) for n, s in zip(logits.shape[:-1], logits.stride()[:-1], strict=True) if n != 1]
    merged: list[tuple[int, int]] = []
    for n, s in dims:
        if merged and merged[-1][1] == n * s:
            merged[-1] = (merged[-1][0] * n, s)
        else:
            merged.append((n, s))
    if len(merged) > 2:
        logits = logits.contiguous()
        merged = [(logits.numel() // max(V, 1), V)]
    while len(merged) < 2:
        merged.insert(0, (1, 0))
    (B, sb), (T, st) = merged
    return logits.as_strided((B, T, V), (sb, st, 1), logits.storage_offset())


def _backend_ops(name: str):
    if name == "cpp":
        return torch.ops.megarlhf.logprobs_fwd, torch.ops.megarlhf.logprobs_bwd
    if name == "triton":
        from megarlhf.kernels import logprobs_triton

        return logprobs_triton.fwd_stats, logprobs_triton.bwd
    from megarlhf.kernels import logprobs_torch

    return logprobs_torch.fwd_stats, logprobs_torch.bwd


def _group_size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def combine_stats(
    stats: torch.Tensor, tp_group: dist.ProcessGroup | None, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stages 2-4: merge the per-rank `[4, N]` (m, s, w, zy) into global (lse, logp, entropy).

    Every output is `[N]` fp32; entropy is zeros when `with_entropy` is False.
    """
    m, s, w, zy = stats.unbind(0)
    if _group_size(tp_group) > 1:
        big_m = m.clone()
        dist.all_reduce(big_m, op=dist.ReduceOp.MAX, group=tp_group)
        # exp(m - M) is 0 for a shard of only -inf columns; guard 0 * inf in the w shift.
        f = torch.exp(m - big_m)
        rows = [s * f]
        if with_entropy:
            rows.append(torch.where(f > 0, f * (w + (m - big_m) * s), 0.0))
        rows.append(zy)
        packed = torch.stack(rows)
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=tp_group)
        s, zy = packed[0], packed[-1]
        w = packed[1] if with_entropy else w
        m = big_m
    log_s = torch.log(s)
    lse = m + log_s
    logp = zy - lse
    ent = log_s - w / s if with_entropy else torch.zeros_like(lse)
    return lse, logp, ent


class _LogProbsFromLogits(torch.autograd.Function):
    """logits -> (logp, entropy) per row, both `[N]` fp32; backward recomputes p from logits."""

    @staticmethod
    def forward(ctx, logits, labels_local, keep, inv_temp, tp_group, with_entropy, backend):
        fwd, _ = _backend_ops(backend)
        x3 = rows_view(logits)
        stats = fwd(x3, labels_local, inv_temp, with_entropy)
        lse, logp, ent = combine_stats(stats, tp_group, with_entropy)
        zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
        logp = torch.where(keep, logp, zero)
        ent = torch.where(keep, ent, zero)
        ctx.save_for_backward(logits, labels_local, keep, lse, ent)
        ctx.inv_temp, ctx.with_entropy, ctx.backend = inv_temp, with_entropy, backend
        if with_entropy:
            return logp, ent
        ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_lp, g_ent):
        logits, labels_local, keep, lse, ent = ctx.saved_tensors
        _, bwd = _backend_ops(ctx.backend)
        zero = torch.zeros((), dtype=torch.float32, device=lse.device)
        g_lp = torch.where(keep, g_lp.float(), zero).contiguous()
        if ctx.with_entropy and g_ent is not None:
            g_ent = torch.where(keep, g_ent.float(), zero).contiguous()
        else:
            g_ent = torch.zeros_like(g_lp)
        grad = bwd(rows_view(logits), labels_local, lse, ent, g_lp, g_ent, ctx.inv_temp)
        return grad.view(logits.shape), None, None, None, None, None, None


def local_labels(
    labels: torch.Tensor, vocab_start: int, vocab_local: int, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global label ids `[...]` -> (`[N]` int64 index into this shard or -1, `[N]` bool keep)."""
    lab = labels.reshape(-1).to(torch.int64)
    keep = lab != ignore_index
    local = lab - vocab_start
    here = keep & (local >= 0) & (local < vocab_local)
    return torch.where(here, local, -1).contiguous(), keep


def logprobs_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    tp_group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ref_logprobs: torch.Tensor | None = None,
    kl_estimator: str = "k3",
    kl_clamp: float = 20.0,
    ignore_index: int = -100,
    backend: str | None = None,
):
    """Log-probability of each label under softmax(logits / temperature), fused over the vocab.

    Args:
        logits: `[..., V_local]` fp32, bf16 or fp16; this rank's contiguous vocabulary shard
            (the whole vocabulary when `tp_group` is None). Not modified; saved (not copied) for
            the backward. Non-contiguous views such as `logits[:, :-1]` are read in place.
        labels: `[...]` global vocabulary ids (any integer dtype); `ignore_index` marks positions
            to skip: log-prob, entropy and KL are 0 there and no gradient flows from them.
        tp_group: the tensor-parallel group the vocabulary is sharded over, or None.
        temperature: divides the logits (> 0), as in sampling.
        return_entropy: also return the entropy of softmax(logits / temperature) per position.
        ref_logprobs: `[...]` reference-policy log-probs of the same labels; when given, also
            return the per-token KL estimate `kl_penalty(logp, ref_logprobs, kl_estimator)`.
        kl_estimator: "k1", "k2" or "k3" (see `megarlhf.kernels.kl`).
        kl_clamp: bound on |log-ratio| inside k3's exp (see `megarlhf.kernels.kl.k3`).
        ignore_index: label value to skip.
        backend: force "triton", "cpp" or "torch" (default: fastest for the device).

    Returns:
        logp `[...]` fp32, differentiable w.r.t. logits. When extras are requested, a tuple in the
        order (logp, entropy) / (logp, kl) / (logp, entropy, kl), each `[...]` fp32.
    """
    if logits.dim() < 1 or labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels {tuple(labels.shape)} must match logits {tuple(logits.shape)} without the "
            "vocabulary dim"
        )
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if ref_logprobs is not None and ref_logprobs.shape != labels.shape:
        raise ValueError(f"ref_logprobs {tuple(ref_logprobs.shape)} must match labels")
    name = select_backend(logits.device, backend)
    if name == "cpp" and logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        name = "torch"  # fp64: the torch path does the per-chunk math in fp64 (fp32 outputs)
    V = logits.shape[-1]
    rank = 0 if tp_group is None else dist.get_rank(tp_group)
    lab, keep = local_labels(labels, rank * V, V, ignore_index)
    logp, ent = _LogProbsFromLogits.apply(
        logits, lab, keep, 1.0 / temperature, tp_group, return_entropy, name
    )
    out = [logp.view(labels.shape)]
    if return_entropy:
        out.append(ent.view(labels.shape))
    if ref_logprobs is not None:
        kl = kl_penalty(out[0], ref_logprobs.float(), kl_estimator, clamp=kl_clamp)
        out.append(torch.where(keep.view(labels.shape), kl, 0.0))
    return out[0] if len(out) == 1 else tuple(out)
