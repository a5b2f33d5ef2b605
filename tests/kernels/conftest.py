"""Fresh random inputs each run: every test in tests/kernels gets a new torch seed, printed so a
failure can be replayed with MEGARLHF_TEST_SEED=<seed>."""

import os

import pytest
import torch


@pytest.fixture(autouse=True)
def fresh_seed():
    seed = int(os.environ.get("MEGARLHF_TEST_SEED", "0")) or int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    print(f"MEGARLHF_TEST_SEED={seed}")
    return seed
