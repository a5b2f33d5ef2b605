"""FLOPs formulas against the closed Megatron formula and hand counts."""

import pytest

from megarlhf.config import ModelConfig
from megarlhf.perf.flops import (
    forward_flops,
    generate_flops,
    megatron_train_flops,
    ppo_iteration_flops,
    train_flops,
)


@pytest.mark.parametrize("recompute", [False, True])
def test_gpt2_blocks_equal_megatron_formula(recompute):
    c = ModelConfig(family="gpt2", vocab_size=2048, hidden_size=256, num_layers=4, num_heads=4)
    ours = train_flops(c, 16, 96, recompute)
    assert ours == pytest.approx(megatron_train_flops(16, 96, 4, 256, 2048, recompute), rel=1e-12)


def test_llama_block_hand_count():
    # h=64, 4 heads of 16, 2 kv heads -> kv width 32; ffn 96; vocab 100; one layer.
    c = ModelConfig(
        family="llama", vocab_size=100, hidden_size=64, num_layers=1, num_heads=4,
        num_kv_heads=2, ffn_hidden_size=96,
    )  # fmt: skip
    per_token = 64 * (64 + 2 * 32) + 64 * 64 + 3 * 64 * 96
    b, s = 2, 10
    want = 2 * b * s * per_token + 4 * b * s * s * 64 + 2 * b * s * 64 * 100
    assert forward_flops(c, b, s) == want


def test_generation_and_ppo_totals():
    c = ModelConfig(family="gpt2", vocab_size=512, hidden_size=64, num_layers=2, num_heads=4)
    # One new token = the prefill with logits of the last position only.
    assert generate_flops(c, 3, 8, 1) == forward_flops(c, 3, 8, head_tokens=1)
    # Each further token costs more than the one before (a longer context).
    steps = [generate_flops(c, 3, 8, n + 1) - generate_flops(c, 3, 8, n) for n in (1, 2, 3)]
    assert steps[0] < steps[1] < steps[2]
    f = ppo_iteration_flops(c, c, c, 4, 8, 16, ppo_epochs=2)
    assert f["total"] == pytest.approx(sum(v for k, v in f.items() if k != "total"))
    # The LM head runs where a response token is predicted (16 of the 24 positions).
    assert f["actor_update"] == 2 * train_flops(c, 4, 24, head_tokens=16)
    assert f["actor_forward"] == forward_flops(c, 4, 24, head_tokens=16)
    assert f["reward_forward"] == forward_flops(c, 4, 24, head_tokens=1)
