"""Trainer configs, LR schedule, DeepSpeed config, up-front refusals, helpers (no processes)."""

from __future__ import annotations

import math

import pytest
import torch

from megarlhf.config import ConfigError, load_config
from megarlhf.config.sft import SFTRunConfig
from megarlhf.optim.deepspeed_model import deepspeed_config
from megarlhf.optim.schedule import warmup_cosine_lr
from megarlhf.utils.metrics import truncate_after
from megarlhf.utils.threads import set_threads_per_rank, threads_per_rank
from tests.trainers.common import ROOT, TINY


@pytest.mark.parametrize("name", ["sft_tiny", "sft_gpt2_124m", "sft_llama_7b", "sft_llama_70b"])
def test_presets_load(name):
    cfg = load_config(SFTRunConfig, ROOT / "configs" / f"{name}.yaml")
    assert cfg.loop.micro_batch_size >= 1


def test_tiny_keeps_its_global_batch_at_any_dp_size():
    cfg = load_config(SFTRunConfig, TINY)
    for dp, accum in [(1, 4), (2, 2), (4, 1)]:
        r = cfg.resolved_passes(dp)
        assert r.grad_accum == accum
        assert cfg.sft.loop.micro_batch_size * r.grad_accum * dp == 8
    with pytest.raises(
        ConfigError, match=r"sft.global_batch_size: 8 is not a multiple of .* 2 \* 8"
    ):
        cfg.resolved_passes(8)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["deepspeed.zero_stage=3", "parallel.pp=2"], "deepspeed.zero_stage: 3 is not supported"),
        (["deepspeed.zero_stage=4"], "deepspeed.zero_stage: 4 is not one of"),
        (["data.seq_len=512"], "data.seq_len: 512 exceeds model.max_seq_len=128"),
        (["optim.min_lr=1.0"], "optim.min_lr: must be in"),
        (["sft.grad_accum=0"], "sft.grad_accum: must be >= 1"),
        (["optim.impl=apex"], "optim.impl: 'apex' not auto|torch"),
        (["sft.micro_batchsize=2"], "unknown config key.*sft.micro_batchsize"),
    ],
)
def test_bad_configs_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(SFTRunConfig, TINY, overrides)


def test_bf16_without_zero_is_refused():
    with pytest.raises(ConfigError, match="deepspeed.zero_stage: 0 runs fp32 only"):
        load_config(SFTRunConfig, TINY, ["model.dtype=bf16", "deepspeed.zero_stage=0"])


def test_warmup_cosine_schedule():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=4, decay_steps=10)
    lrs = [warmup_cosine_lr(s, **kw) for s in range(20)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0)
    # Halfway through the decay: the midpoint of lr and min_lr.
    assert lrs[9] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[14:] == pytest.approx([0.1] * 6)
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:], strict=False))
    assert warmup_cosine_lr(0, lr=1.0, min_lr=0.0, warmup_steps=0, decay_steps=4) == 1.0


def test_deepspeed_config_follows_the_run_config():
    cfg = load_config(SFTRunConfig, TINY, ["deepspeed.zero_stage=2", "model.dtype=bf16"])
    kw = dict(micro_batch_size=cfg.loop.micro_batch_size, dp_size=2)
    ds = deepspeed_config(
        optim=cfg.optim, deepspeed=cfg.deepspeed, bf16=True,
        grad_accum=cfg.resolved_passes(2).grad_accum, **kw,
    )  # fmt: skip
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (2, 2)
    assert ds["train_batch_size"] == 8
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"] == {"enabled": True}
    assert ds["gradient_clipping"] == cfg.optim.clip_grad
    zero0 = load_config(SFTRunConfig, TINY, ["deepspeed.zero_stage=0"])
    stage0 = deepspeed_config(
        optim=zero0.optim, deepspeed=zero0.deepspeed, bf16=False, grad_accum=1, **kw
    )
    assert stage0["gradient_clipping"] == 0.0  # clipped by DeepSpeedModel itself


def test_threads_per_rank():
    assert threads_per_rank(4, cores=2) == 1
    assert threads_per_rank(2, cores=16) == 8
    saved = torch.get_num_threads()
    try:
        env = {"LOCAL_SIZE": "2"}  # the deepspeed launcher's local rank count
        n = set_threads_per_rank(env)
        assert env["OMP_NUM_THREADS"] == str(n) and n == threads_per_rank(2)
        assert torch.get_num_threads() == n
        assert set_threads_per_rank({"OMP_NUM_THREADS": "3", "LOCAL_WORLD_SIZE": "8"}) == 3
    finally:
        torch.set_num_threads(saved)


def test_metrics_truncated_to_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    assert truncate_after(path, 2) == 2
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
