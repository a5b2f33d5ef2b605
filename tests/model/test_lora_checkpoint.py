"""LoRA checkpoints in one process: a directory holds the adapters only and names its base; it
reads as the merged model (reader, load_model_shard, init_from, re-sharding); `restore_base`
puts the frozen weights back from a base checkpoint or from the seed; a missing base is named."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors import safe_open

from megarlhf.checkpoint.errors import CheckpointError
from megarlhf.checkpoint.init_from import load_init_weights, restore_base
from megarlhf.checkpoint.lora_shards import LoRABase
from megarlhf.checkpoint.model_shards import (
    ModelShardsReader,
    load_model_shard,
    rank_file,
    read_meta,
    save_model_shard,
)
from megarlhf.config.model import LoRAConfig
from megarlhf.convert import reshard
from megarlhf.engine.reshard import reshard_weights
from megarlhf.model.gpt import GPTModel, lora_sharding_plan
from megarlhf.model.lora import base_config
from megarlhf.parallel.state import single_process_state
from tests.model.common import rel_err, tiny_config
from tests.model.test_lora import randomize_adapters

PS = single_process_state()
LORA = LoRAConfig(rank=3, alpha=6.0, target_modules=["qkv", "proj", "fc2"])


def _save(path, model: GPTModel) -> None:
    save_model_shard(
        path, model.state_dict(), model.cfg, tp=1, tp_rank=0, pp=1, pp_rank=0,
        lora_base=LoRABase.of(model) if model.cfg.lora.enabled else None,
    )  # fmt: skip


def _merged(model: GPTModel) -> dict:
    plain = GPTModel(base_config(model.cfg), PS, skip_init=True)
    reshard_weights(model, plain)
    return dict(plain.named_parameters())


@pytest.fixture()
def base_dir(tmp_path):
    """A plain llama checkpoint at TP=2 (re-sharded from TP=1)."""
    cfg = tiny_config("llama")
    _save(tmp_path / "base_tp1", GPTModel(cfg, PS, seed=21))
    reshard(tmp_path / "base_tp1", tmp_path / "base", tp=2, pp=1)
    return tmp_path / "base"


def test_adapters_only_and_read_as_the_merged_model(base_dir, tmp_path):
    cfg = dataclasses.replace(read_meta(base_dir).model, lora=LORA)
    model = GPTModel(cfg, PS, seed=4)
    load_init_weights(model, base_dir, PS)
    assert model.base_checkpoint == str(base_dir.resolve())
    randomize_adapters(model)
    _save(tmp_path / "lora", model)
    with safe_open(rank_file(tmp_path / "lora", 0, 0), "pt") as f:
        assert sorted(f.keys()) == sorted(lora_sharding_plan(cfg, 1))
    meta = read_meta(tmp_path / "lora")
    assert meta.model == base_config(cfg) and meta.adapters.lora == LORA
    assert meta.adapters.base == LoRABase(str(base_dir.resolve()), 4)

    want = _merged(model)
    with ModelShardsReader(tmp_path / "lora") as r:
        assert r.cfg == base_config(cfg) and set(r.names()) == set(want)
        for name in r.names():
            got = r.full_tensor(name)  # vocabulary unpadded, as every reader gives it
            assert torch.allclose(got, want[name].detach()[: len(got)], atol=1e-6), name
            assert r.info(name)[0] == tuple(got.shape)
    # Any consumer of model shards sees the merged model: a plain model loads it strictly.
    plain = GPTModel(base_config(cfg), PS, skip_init=True)
    plain.load_state_dict(load_model_shard(tmp_path / "lora", tp=1, tp_rank=0, pp=1, pp_rank=0))
    ids = torch.randint(0, cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        v = slice(0, cfg.vocab_size)
        assert rel_err(plain(ids)[..., v], model(ids)[..., v]) < 1e-5
    # init_from into a LoRA model: the merged weights become its base, its adapters fresh.
    again = GPTModel(cfg, PS, seed=9)
    load_init_weights(again, tmp_path / "lora", PS)
    p = dict(again.named_parameters())
    assert torch.allclose(p["layers.0.attention.qkv.weight"], want["layers.0.attention.qkv.weight"])
    assert p["layers.0.attention.qkv.lora.b"].abs().sum() == 0
    # Re-sharding writes a plain checkpoint of the merged model.
    reshard(tmp_path / "lora", tmp_path / "merged_tp2", tp=2, pp=1)
    assert read_meta(tmp_path / "merged_tp2").adapters is None
    with ModelShardsReader(tmp_path / "merged_tp2") as r:
        assert torch.allclose(r.full_tensor("layers.2.mlp.fc2.weight"),
                              want["layers.2.mlp.fc2.weight"].detach())  # fmt: skip


def test_restore_base_from_a_checkpoint_and_from_the_seed(base_dir, tmp_path):
    cfg = dataclasses.replace(read_meta(base_dir).model, lora=LORA)
    trained = GPTModel(cfg, PS, seed=4)
    load_init_weights(trained, base_dir, PS)
    randomize_adapters(trained)
    resumed = GPTModel(cfg, PS, seed=4)  # as a resuming run builds it: base not loaded yet
    restore_base(resumed, LoRABase.of(trained), PS)
    for (n, a), (_, b) in zip(trained.named_parameters(), resumed.named_parameters(), strict=True):
        if not a.requires_grad:
            assert torch.equal(a, b), n
        else:
            assert n.endswith(".a") or b.abs().sum() == 0  # what trains is left to DeepSpeed
    # A seeded base (no checkpoint): rebuilt exactly, at any seed the new model was built with.
    seeded = GPTModel(cfg, PS, seed=13)
    other = GPTModel(cfg, PS, seed=99)
    restore_base(other, LoRABase(None, 13), PS)
    for (n, a), (_, b) in zip(seeded.named_parameters(), other.named_parameters(), strict=True):
        if not a.requires_grad:
            assert torch.equal(a, b), n
    # ... and its checkpoint reads as the merged seeded model.
    randomize_adapters(seeded)
    _save(tmp_path / "seeded", seeded)
    want = _merged(seeded)
    with ModelShardsReader(tmp_path / "seeded") as r:
        for name in ("embedding.word.weight", "layers.1.attention.qkv.weight", "output.weight"):
            assert torch.allclose(r.full_tensor(name), want[name][: r.info(name)[0][0]], atol=1e-6)


def test_a_missing_base_is_named(base_dir, tmp_path):
    import shutil

    cfg = dataclasses.replace(read_meta(base_dir).model, lora=LORA)
    model = GPTModel(cfg, PS, seed=4)
    load_init_weights(model, base_dir, PS)
    _save(tmp_path / "lora", model)
    shutil.rmtree(base_dir)
    with ModelShardsReader(tmp_path / "lora") as r, pytest.raises(CheckpointError, match="gone"):
        r.full_tensor("layers.0.attention.qkv.weight")
    from megarlhf.config import ConfigError

    with pytest.raises(ConfigError, match="is gone"):
        restore_base(GPTModel(cfg, PS, seed=4), LoRABase.of(model), PS)
    with pytest.raises(CheckpointError, match="needs its base"):
        save_model_shard(tmp_path / "x", model.state_dict(), cfg, tp=1, tp_rank=0, pp=1, pp_rank=0)
