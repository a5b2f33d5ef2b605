"""Forward-backward schedules over micro-batches: no pipelining, and non-interleaved 1F1B.

Both schedules share one signature, so a trainer picks one with `get_forward_backward_func` and
never branches on the layout:

    fn(*, model, micro_batches, loss_fn, ps, forward_only=False, backward_fn=None) -> list[dict]

1F1B (PipeDream-Flush, Megatron's `forward_backward_pipelining_without_interleaving`): stage `p`
of `P` runs `min(P - p - 1, n)` warm-up forwards, then alternates one forward and one backward
(steady state), then drains the remaining backwards (cool-down). Backwards run in micro-batch
order 0..n-1 on every stage. At most `min(P - p, n)` micro-batches are in flight on stage `p`
(forward done, backward not yet), against `n` for GPipe-style all-forward-then-all-backward.

Memory per stage: the autograd graphs of the micro-batches in flight, plus for each one its input
activation [mb, s, h] (received; the graph keeps it anyway) and, with the default backward, not its
output: after the output is sent on, its storage is released and only its graph is kept
(Megatron's `deallocate_output_tensor`). The last stage runs each backward right after its forward,
so its logits [mb, s, vocab / tp] never outlive one micro-batch.

What the schedule does not do:
- rescale the loss (the caller normalizes, e.g. by the token count of the whole global batch);
- sync the tied embedding gradients of first and last stage: call
  `model.sync_tied_embedding_grads()` after the schedule and before clipping / the optimizer step;
- reduce gradients over data parallelism (the optimizer / DeepSpeed engine does).

Simplifications: no interleaved (virtual-stage) schedule, no overlap of p2p with compute.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable

import torch

from megarlhf.parallel import p2p
from megarlhf.parallel.p2p import TensorMeta
from megarlhf.parallel.state import ParallelState

# loss_fn(last stage output, micro_batch) -> (loss scalar, stats); the output is the logits shard
# [mb, s, vocab / tp], or the scores [mb, s, k] of a scalar head (reward model, critic)
LossFn = Callable[[torch.Tensor, dict], tuple[torch.Tensor | None, dict]]
# backward_fn(tensor, grad): (loss, None) on the last stage, (output [mb, s, h], grad) elsewhere
BackwardFn = Callable[[torch.Tensor, torch.Tensor | None], None]

# Tensors of a micro-batch passed to the model at every stage (input_ids only at the first).
# (output_index only matters to the last stage: the positions its head runs on.)
_STAGE_INPUTS = ("attention_mask", "position_ids", "segment_ids", "output_index")
SCHEDULES = ("1f1b", "interleaved")


def get_forward_backward_func(ps: ParallelState, schedule: str = "1f1b") -> Callable[..., list]:
    """The schedule to run for layout `ps`.

    Args:
        ps: the layout; with `pp_size == 1` every schedule is plain gradient accumulation.
        schedule: "1f1b" (non-interleaved). "interleaved" is reserved for virtual pipeline stages.
    Raises:
        NotImplementedError: for schedule="interleaved".
        ValueError: for an unknown schedule name.
    """
    if schedule == "interleaved":
        raise NotImplementedError(
            "parallel.pipeline_schedule='interleaved' (virtual pipeline stages) is not "
            "implemented yet; use '1f1b'"
        )
    if schedule != "1f1b":
        raise ValueError(f"unknown pipeline schedule {schedule!r}; choose one of {SCHEDULES}")
    if ps.pp_size == 1:
        return forward_backward_no_pipelining
    return forward_backward_pipelining_1f1b


def forward_backward_no_pipelining(
    *,
    model,
    micro_batches: list[dict[str, torch.Tensor]],
    loss_fn: LossFn,
    ps: ParallelState,
    forward_only: bool = False,
    backward_fn: BackwardFn | None = None,
) -> list[dict]:
    """Gradient accumulation over micro-batches on a single pipeline stage (pp_size == 1).

    Args: as `forward_backward_pipelining_1f1b`.
    Returns:
        loss_fn's stats, one dict per micro-batch.
    """
    if ps.pp_size != 1:
        raise ValueError(
            f"forward_backward_no_pipelining needs pp_size == 1, got {ps.pp_size}; "
            "use get_forward_backward_func(ps)"
        )
    _check_micro_batches(micro_batches)
    backward = backward_fn or _default_backward
    stats = []
    for mb in micro_batches:
        with torch.no_grad() if forward_only else contextlib.nullcontext():
            loss, st = _forward_step(model, mb, None, loss_fn, ps)
        if not forward_only:
            _check_loss(loss)
            backward(loss, None)
        stats.append(st)
    return stats


def forward_backward_pipelining_1f1b(
    *,
    model,
    micro_batches: list[dict[str, torch.Tensor]],
    loss_fn: LossFn,
    ps: ParallelState,
    forward_only: bool = False,
    backward_fn: BackwardFn | None = None,
) -> list[dict]:
    """Run one global batch through this rank's pipeline stage with the 1F1B schedule.

    Every rank of the pipeline calls this with the same micro-batches (at least the same shapes:
    they size the p2p buffers). Micro-batches may differ in shape from each other; any number
    n >= 1 works (n < pp simply shortens the warm-up).

    Args:
        model: this stage's GPTModel, or a wrapper that calls it and exposes it as `.module`
            (DeepSpeed engine). The first stage is called as
            `model(input_ids, attention_mask=, position_ids=, segment_ids=)`, the others as
            `model(hidden_states=h, ...)`; optional tensors absent from a micro-batch are omitted.
        micro_batches: each a dict with `input_ids` [mb, s] and optionally `attention_mask`,
            `position_ids`, `segment_ids` [mb, s] (passed to every stage), `labels` and anything
            else loss_fn reads.
        loss_fn: `loss_fn(output, micro_batch) -> (loss, stats)` on the last stage, where output
            is what the last stage returns (logits shard [mb, s, vocab / tp], or scalar-head
            scores). The loss is a scalar already normalized for the whole global batch (the
            schedule sums gradients over micro-batches and never rescales). With forward_only the
            loss may be None and stats carry the outputs (e.g. per-token log-probs).
        ps: the layout (pp group, neighbours, stage).
        forward_only: evaluation: forwards under no_grad, nothing kept for backward.
        backward_fn: `backward_fn(tensor, grad)`, called exactly once per micro-batch, in
            micro-batch order, with (loss, None) on the last stage and (output [mb, s, h],
            grad of output) elsewhere. Default: `torch.autograd.backward`. With a custom
            backward_fn the output tensors stay allocated until their backward.
    Returns:
        On the last stage, loss_fn's stats, one dict per micro-batch in order; elsewhere [].
        Tied embedding gradients are NOT synced here: call `model.sync_tied_embedding_grads()`.
    """
    _check_micro_batches(micro_batches)
    run = _OneFOneB(model, micro_batches, loss_fn, ps, forward_only, backward_fn)
    steady = run.warmup()
    run.steady(steady)
    if not forward_only:
        run.cooldown(steady)
    assert not run.in_flight, "1F1B schedule left micro-batches without backward"
    return run.stats if ps.is_last_stage else []


class _OneFOneB:
    """The state of one 1F1B pass over this stage: the micro-batches in flight (forward done,
    backward not yet) and the last stage's stats; the three phases as methods."""

    def __init__(self, model, micro_batches, loss_fn, ps, forward_only, backward_fn):
        self.model, self.mbs, self.loss_fn, self.ps = model, micro_batches, loss_fn, ps
        self.forward_only = forward_only
        self.metas = [_activation_meta(model, mb) for mb in micro_batches]  # same on every stage
        self.free_outputs = backward_fn is None
        self.backward_fn = backward_fn or _default_backward
        self.stats: list[dict] = []
        self.in_flight: deque[tuple[torch.Tensor | None, torch.Tensor]] = deque()

    def forward(self, i: int, x: torch.Tensor | None) -> torch.Tensor | None:
        ps = self.ps
        with torch.no_grad() if self.forward_only else contextlib.nullcontext():
            if x is not None and not self.forward_only:
                x.requires_grad_(True)
            out, st = _forward_step(self.model, self.mbs[i], x, self.loss_fn, ps)
        if ps.is_last_stage:
            self.stats.append(st)
            if not self.forward_only:
                _check_loss(out)
        else:
            _check_activation(out, self.metas[i], ps)
        return out

    def keep(self, x: torch.Tensor | None, out: torch.Tensor) -> None:
        # Called after `out` was sent on: its data is no longer needed, only its graph.
        if self.free_outputs and not self.ps.is_last_stage:
            _release_storage(out)
        self.in_flight.append((x, out))

    def backward_oldest(self, grad: torch.Tensor | None) -> torch.Tensor | None:
        x, out = self.in_flight.popleft()
        if self.free_outputs and not self.ps.is_last_stage:
            _backward_released(out, grad)
        else:
            self.backward_fn(out, grad)
        if x is None:  # first stage: nothing to send back
            return None
        if x.grad is None:
            raise RuntimeError(
                f"pipeline stage {self.ps.pp_rank}: the input activation got no gradient; the "
                "stage's output does not depend on its input"
            )
        return x.grad

    def warmup(self) -> int:
        """The warm-up forwards; returns the number of steady-state micro-batches."""
        ps, n = self.ps, len(self.mbs)
        warmup = min(ps.pp_size - ps.pp_rank - 1, n)
        for i in range(warmup):
            x = p2p.recv_forward(self.metas[i], ps)
            out = self.forward(i, x)
            p2p.send_forward(out, ps)
            if not self.forward_only:
                self.keep(x, out)
        return n - warmup

    def steady(self, steady: int) -> None:
        """One forward, one backward per micro-batch after the warm-up."""
        ps, metas = self.ps, self.metas
        warmup = len(self.mbs) - steady
        x = p2p.recv_forward(metas[warmup], ps) if steady > 0 else None
        for k in range(steady):
            i = warmup + k  # micro-batch of this forward; the backward is micro-batch k
            last = k == steady - 1
            out = self.forward(i, x)
            if self.forward_only:
                p2p.send_forward(out, ps)
                x = None if last else p2p.recv_forward(metas[i + 1], ps)
                continue
            grad = p2p.send_forward_recv_backward(out, metas[k], ps)
            self.keep(x, out)
            x_grad = self.backward_oldest(grad)
            if last:
                x = None
                p2p.send_backward(x_grad, ps)
            else:
                x = p2p.send_backward_recv_forward(x_grad, metas[i + 1], ps)

    def cooldown(self, steady: int) -> None:
        """The warm-up micro-batches' backwards."""
        for k in range(steady, len(self.mbs)):
            grad = p2p.recv_backward(self.metas[k], self.ps)
            p2p.send_backward(self.backward_oldest(grad), self.ps)


# --------------------------------------------------------------------------- steps and checks


def _forward_step(model, mb: dict, x: torch.Tensor | None, loss_fn: LossFn, ps: ParallelState):
    """Run the stage on one micro-batch; on the last stage also the loss.

    Returns:
        (hidden [mb, s, h], None) on a non-last stage; (loss, stats) on the last.
    """
    kwargs = {k: mb[k] for k in _STAGE_INPUTS if mb.get(k) is not None}
    if ps.is_first_stage:
        out = model(mb["input_ids"], **kwargs)
    else:
        out = model(hidden_states=x, **kwargs)
    if not ps.is_last_stage:
        return out, None
    loss, stats = loss_fn(out, mb)
    return loss, stats


def _default_backward(tensor: torch.Tensor, grad: torch.Tensor | None) -> None:
    torch.autograd.backward(tensor, grad)


def _release_storage(out: torch.Tensor) -> None:
    """Free an output's data once sent; its grad_fn (what backward needs) stays.

    Autograd saves what it needs for backward separately, so this only drops the [mb, s, h] the
    output itself holds. Such a tensor can no longer go through `torch.autograd.backward`, whose
    shape check compares the gradient with the (now 1-element) data: see `_backward_released`.
    """
    if out._base is None:  # never swap the data of a view (it would detach it from its base)
        out.data = torch.empty((1,), dtype=out.dtype, device=out.device)


def _backward_released(out: torch.Tensor, grad: torch.Tensor) -> None:
    """Backward from an output whose storage was released (Megatron's `custom_backward`).

    Calls the autograd engine directly: the engine validates `grad` against the shape recorded in
    `out.grad_fn` at creation, not against `out`'s current data.
    """
    torch.autograd.Variable._execution_engine.run_backward(
        tensors=(out,),
        grad_tensors=(grad,),
        keep_graph=False,
        create_graph=False,
        inputs=(),
        allow_unreachable=True,
        accumulate_grad=True,
    )


def _stage_module(model):
    """The GPTModel itself, or the one a wrapper holds as `.module` (DeepSpeed's engine)."""
    m = model
    for _ in range(8):
        if hasattr(m, "cfg"):
            return m
        if not hasattr(m, "module"):
            break
        m = m.module
    raise TypeError(
        f"cannot find the model config on {type(model).__name__}: pass a GPTModel or a wrapper "
        "that exposes it as `.module`"
    )


def _activation_meta(model, mb: dict) -> TensorMeta:
    """Shape, dtype, device of the activation between stages for micro-batch `mb`.

    The dtype is the parameters' (what the stage computes in), not `cfg.dtype`: DeepSpeed's bf16
    mode casts the module to bf16 while the config may still say fp32.
    """
    stage = _stage_module(model)
    dtype = next((p.dtype for p in stage.parameters() if p.is_floating_point()), None)
    ids = mb["input_ids"]
    shape = (ids.shape[0], ids.shape[1], stage.cfg.hidden_size)
    return TensorMeta(shape, dtype or stage.cfg.torch_dtype, ids.device)


def _check_micro_batches(micro_batches) -> None:
    if not isinstance(micro_batches, (list, tuple)) or not micro_batches:
        raise ValueError("micro_batches must be a non-empty list of dicts")
    for j, mb in enumerate(micro_batches):
        ids = mb.get("input_ids") if isinstance(mb, dict) else None
        if ids is None or ids.dim() != 2:
            raise ValueError(f"micro_batches[{j}] needs 'input_ids' of shape [micro_batch, seq]")


def _check_loss(loss) -> None:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(f"loss_fn must return a scalar loss tensor when training, got {loss!r}")


def _check_activation(out: torch.Tensor, meta: TensorMeta, ps: ParallelState) -> None:
    # The receiver allocated `meta` blindly; a mismatch would garble or hang the transfer.
    if tuple(out.shape) != meta.shape or out.dtype != meta.dtype:
        raise RuntimeError(
            f"pipeline stage {ps.pp_rank} produced {tuple(out.shape)} {out.dtype}, but the next "
            f"stage expects {meta.shape} {meta.dtype} ([micro_batch, seq, hidden_size] in the "
            "parameters' dtype)"
        )
