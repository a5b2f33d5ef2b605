"""A resumable, data-parallel sampler over training rows (packed rows or single samples).

Each epoch visits the rows in a fresh order, `permutation(num_rows)` of a numpy generator seeded
with (seed, epoch), so the order depends only on the seed and the epoch number, never on how far
a previous run got. An optimizer step takes the next `global_batch = micro_batch_size * grad_accum
* dp_size` rows of that order; data-parallel rank r takes the r-th contiguous block of
`micro_batch_size * grad_accum` of them, cut into `grad_accum` micro-batches. The rows of a global
batch are therefore the same for any dp_size with the same global batch size.

An epoch has `num_rows // global_batch` steps; the remaining `num_rows % global_batch` rows are not
used in that epoch (a different remainder each epoch, as the order changes). The state is
(epoch, position): rows consumed in the current epoch, always a whole number of global batches.
After an epoch's last step the state is already (epoch + 1, 0), so a run resumed from a
checkpoint taken exactly at an epoch boundary starts the next epoch at its first row.
"""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)


class ResumableSampler:
    """Row indices for each optimizer step of one data-parallel rank; see the module docstring.

    Args:
        num_rows: number of rows to sample from.
        micro_batch_size: rows per micro-batch.
        grad_accum: micro-batches per optimizer step on each rank.
        dp_rank: this rank's index in the data-parallel group.
        dp_size: data-parallel group size.
        seed: seed of the per-epoch order.
    """

    def __init__(
        self,
        num_rows: int,
        micro_batch_size: int,
        grad_accum: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
    ):
        if micro_batch_size < 1 or grad_accum < 1 or dp_size < 1:
            raise ValueError(
                f"micro_batch_size={micro_batch_size}, grad_accum={grad_accum}, "
                f"dp_size={dp_size}: all must be >= 1"
            )
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} is not in [0, dp_size={dp_size})")
        self.num_rows = num_rows
        self.micro_batch_size = micro_batch_size
        self.grad_accum = grad_accum
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.global_batch_size = micro_batch_size * grad_accum * dp_size
        self.steps_per_epoch = num_rows // self.global_batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{num_rows} training rows are fewer than one global batch of "
                f"{self.global_batch_size} (micro_batch_size {micro_batch_size} x grad_accum "
                f"{grad_accum} x dp_size {dp_size})"
            )
        unused = num_rows - self.steps_per_epoch * self.global_batch_size
        if unused:
            logger.info(
                "each epoch uses %d of %d rows (%d steps of %d); the %d left over differ per epoch",
                num_rows - unused,
                num_rows,
                self.steps_per_epoch,
                self.global_batch_size,
                unused,
            )
        self.epoch = 0
        self.position = 0
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The order in which epoch `epoch` visits the rows, [num_rows]."""
        if epoch != self._order_epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
            self._order_epoch = epoch
        return self._order

    def next_step(self) -> list[list[int]]:
        """This rank's rows for the next optimizer step: grad_accum lists of micro_batch_size."""
        order = self.epoch_order(self.epoch)
        per_rank = self.micro_batch_size * self.grad_accum
        start = self.position + self.dp_rank * per_rank
        mine = order[start : start + per_rank].tolist()
        self.position += self.global_batch_size
        if self.position == self.steps_per_epoch * self.global_batch_size:
            self.epoch += 1
            self.position = 0
        m = self.micro_batch_size
        return [mine[i * m : (i + 1) * m] for i in range(self.grad_accum)]

    def state_dict(self) -> dict:
        """Position to resume from, plus what it is only valid for (checked on load)."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_rows": self.num_rows,
            "global_batch_size": self.global_batch_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue at `state`; refuse a state saved for other data, seed or global batch."""
        for key in ("seed", "num_rows", "global_batch_size"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state was saved with {key}={state[key]}, this run has "
                    f"{key}={getattr(self, key)}: resuming needs the same data, seed and global "
                    "batch size (dp_size may change)"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        end = self.steps_per_epoch * self.global_batch_size
        if epoch < 0 or position < 0 or position >= end or position % self.global_batch_size:
            raise ValueError(f"sampler state epoch={epoch}, position={position} is not valid")
        self.epoch, self.position = epoch, position


class StepLoader:
    """Micro-batch dicts for each optimizer step of one rank: the sampler's indices, collated.

    Subclasses say how a micro-batch of indices becomes tensors (`collate`); the position in the
    data (for resume) is the sampler's.
    """

    def __init__(self, sampler: ResumableSampler, num_items: int, what: str = "rows"):
        if sampler.num_rows != num_items:
            raise ValueError(f"sampler has {sampler.num_rows} {what}, the data {num_items}")
        self.sampler = sampler

    def collate(self, indices):
        raise NotImplementedError

    @property
    def epoch(self) -> int:
        """Epochs completed so far (the epoch the next step belongs to)."""
        return self.sampler.epoch

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def next_step(self) -> list[dict]:
        """This rank's `grad_accum` micro-batches for the next optimizer step."""
        return [self.collate(mb) for mb in self.sampler.next_step()]

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


def even_split(num_items: int, micro_batch_size: int, dp_rank: int, dp_size: int):
    """This rank's micro-batches of item indices, the same count on every rank.

    Items are dealt round-robin over the ranks, then each rank cuts its share into
    `ceil(ceil(num_items / dp_size) / micro_batch_size)` nearly equal micro-batches. A micro-batch
    left empty holds item 0 and is flagged as filler.

    Returns:
        [(indices, filler)] of equal length on every rank.
    """
    if num_items < 1:
        raise ValueError("even_split needs at least one item")
    mine = list(range(dp_rank, num_items, dp_size))
    most = -(-num_items // dp_size)
    n_mb = -(-most // micro_batch_size)
    base, extra = divmod(len(mine), n_mb)
    out, start = [], 0
    for j in range(n_mb):
        size = base + (1 if j < extra else 0)
        chunk = mine[start : start + size]
        start += size
        out.append((chunk, False) if chunk else ([0], True))
    return out
