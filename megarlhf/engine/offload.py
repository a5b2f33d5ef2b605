"""Placement of the frozen PPO models (reference, reward model).

A frozen model runs its forwards on the compute device (where the actor lives). With `offload`,
it is kept in CPU memory between uses and moved to the device only for the duration of `use()`,
trading a host-device copy per rollout for the device memory of a whole model (on a CPU-only
machine both places are the same and nothing moves).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


class FrozenModel:
    """A model that is never trained: eval mode, no gradients, placed per `offload`.

    Args:
        model: the model (any layout); moved in place.
        device: compute device of its forwards.
        offload: keep it in CPU memory between uses.
    """

    def __init__(self, model: nn.Module, device: torch.device | str, offload: bool = False):
        self.model = model.eval().requires_grad_(False)
        self.device = torch.device(device)
        self.offload = offload
        self.model.to("cpu" if offload else self.device)

    @contextlib.contextmanager
    def use(self):
        """The model on the compute device for the body (moved back to CPU after, if offloaded)."""
        if self.offload:
            self.model.to(self.device)
        try:
            yield self.model
        finally:
            if self.offload:
                self.model.to("cpu")
