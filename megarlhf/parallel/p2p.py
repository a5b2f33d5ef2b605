"""Point-to-point transfer of activations and gradients between adjacent pipeline stages.

Stage `p` sends its output activation forward to stage `p + 1` and the gradient of its input back
to stage `p - 1`; peers are the global ranks in `ps.pp_ranks` (the same TP and DP coordinates, so
separate pipelines of a DP x TP grid never exchange messages). Every TP rank of a stage sends its
full replicated copy of the hidden states to its counterpart in the next stage (no scatter/gather
over TP; that optimization is left out).

Shapes are known on both sides in advance (the micro-batch shape and `cfg.hidden_size`; every stage
sees the same micro-batches), so there is no shape handshake: the receiver allocates
`[micro_batch, seq, hidden]` and the sender must send exactly that (the schedule checks it).

Each exchange is posted as one batch of non-blocking operations (`dist.batch_isend_irecv`:
coalesced on NCCL, individual isend/irecv on gloo) and waited on before returning, so the paired
calls of the 1F1B steady state (stage p: send forward + receive backward; stage p + 1: send
backward + receive forward) cannot deadlock whatever order the two ranks reach them in. Between
one pair of ranks each direction carries only one kind of message (activations go p -> p + 1,
gradients p + 1 -> p), and messages in one direction are matched in posting order.

Simplifications: synchronous from the caller's view (no overlap of communication with compute).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megarlhf.parallel.state import ParallelState


@dataclass(frozen=True)
class TensorMeta:
    """What a receiver allocates: shape, dtype and device of the incoming tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    def empty(self) -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.dtype, device=self.device)


def _communicate(
    ps: ParallelState,
    *,
    send_next: torch.Tensor | None = None,
    send_prev: torch.Tensor | None = None,
    recv_prev: TensorMeta | None = None,
    recv_next: TensorMeta | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Post up to four transfers with this stage's neighbours as one batch and wait for them.

    Transfers towards a neighbour that does not exist (before the first stage, after the last) are
    skipped, so the callers below are no-ops at the pipeline's ends.

    Returns:
        (tensor received from the previous stage, tensor received from the next stage), each
        None when not requested or not applicable.
    """
    has_prev, has_next = not ps.is_first_stage, not ps.is_last_stage
    ops: list[dist.P2POp] = []
    from_prev = recv_prev.empty() if recv_prev is not None and has_prev else None
    from_next = recv_next.empty() if recv_next is not None and has_next else None
    # Order within a batch does not matter for correctness (see module docstring); keep Megatron's
    # order anyway: send prev, recv prev, send next, recv next.
    if send_prev is not None and has_prev:
        ops.append(dist.P2POp(dist.isend, send_prev.contiguous(), ps.prev_rank, ps.pp_group))
    if from_prev is not None:
        ops.append(dist.P2POp(dist.irecv, from_prev, ps.prev_rank, ps.pp_group))
    if send_next is not None and has_next:
        ops.append(dist.P2POp(dist.isend, send_next.contiguous(), ps.next_rank, ps.pp_group))
    if from_next is not None:
        ops.append(dist.P2POp(dist.irecv, from_next, ps.next_rank, ps.pp_group))
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    return from_prev, from_next


def recv_forward(meta: TensorMeta, ps: ParallelState) -> torch.Tensor | None:
    """Receive the previous stage's output activation (None on the first stage)."""
    return _communicate(ps, recv_prev=meta)[0]


def send_forward(output: torch.Tensor, ps: ParallelState) -> None:
    """Send this stage's output activation to the next stage (no-op on the last stage)."""
    _communicate(ps, send_next=output)


def recv_backward(meta: TensorMeta, ps: ParallelState) -> torch.Tensor | None:
    """Receive the gradient of this stage's output from the next stage (None on the last)."""
    return _communicate(ps, recv_next=meta)[1]


def send_backward(input_grad: torch.Tensor, ps: ParallelState) -> None:
    """Send the gradient of this stage's input to the previous stage (no-op on the first)."""
    _communicate(ps, send_prev=input_grad)


def send_forward_recv_backward(
    output: torch.Tensor, meta: TensorMeta, ps: ParallelState
) -> torch.Tensor | None:
    """1F1B steady state, after a forward: send the output on, receive an output gradient.

    The gradient received belongs to the oldest micro-batch in flight, not necessarily to
    `output`'s. Pairs with the next stage's `send_backward_recv_forward`.
    """
    return _communicate(ps, send_next=output, recv_next=meta)[1]


def send_backward_recv_forward(
    input_grad: torch.Tensor, meta: TensorMeta, ps: ParallelState
) -> torch.Tensor | None:
    """1F1B steady state, after a backward: send the input gradient back, receive the next input.

    Pairs with the previous stage's `send_forward_recv_backward`.
    """
    return _communicate(ps, send_prev=input_grad, recv_prev=meta)[0]
