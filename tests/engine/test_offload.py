"""FrozenModel: eval mode, no gradients, and the placement protocol of offloading."""

import torch
from torch import nn

from megarlhf.engine.offload import FrozenModel


class _Recorder(nn.Linear):
    """A module that records where it is asked to move (a CPU-only machine has one device)."""

    def __init__(self):
        super().__init__(3, 2)
        self.moves = []

    def to(self, device):
        self.moves.append(str(device))
        return super().to(device)


def test_offloaded_model_moves_to_device_only_inside_use():
    rec = _Recorder().train()
    frozen = FrozenModel(rec, "cpu", offload=True)
    assert not rec.training and not any(p.requires_grad for p in rec.parameters())
    assert rec.moves == ["cpu"]  # parked in CPU memory
    with frozen.use() as m:
        assert m is rec and rec.moves == ["cpu", "cpu"]  # moved to the compute device
        y = m(torch.ones(1, 3))
    assert rec.moves == ["cpu", "cpu", "cpu"]  # and back
    assert y.shape == (1, 2)


def test_resident_model_stays_put():
    rec = _Recorder()
    frozen = FrozenModel(rec, "cpu", offload=False)
    with frozen.use():
        pass
    assert rec.moves == ["cpu"]  # placed once on the compute device, never moved again
