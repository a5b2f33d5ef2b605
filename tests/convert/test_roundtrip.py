"""Bit-exactness of the format and the conversions: export back to HF gives the original tensors
bit for bit (and transformers loads it), TP2.PP2 -> TP1.PP1 -> TP2.PP2 reproduces every rank file,
the model's own state dicts save into the same files, and a strict load refuses another layout."""

import json

import pytest
import torch
from safetensors.torch import load_file

from megarlhf.checkpoint.model_shards import (
    CheckpointError,
    load_model_shard,
    rank_file,
    read_meta,
    save_model_shard,
)
from megarlhf.convert import hf_to_megarlhf, megarlhf_to_hf, reshard
from megarlhf.model.gpt import GPTModel
from megarlhf.parallel.state import ParallelState
from tests.convert.conftest import LAYOUTS, MODELS


def _hf_state(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()


def _rank_files(ckpt):
    meta = read_meta(ckpt)
    return {
        (t, p): load_file(rank_file(ckpt, t, p)) for t in range(meta.tp) for p in range(meta.pp)
    }


def _assert_same_tensors(a: dict, b: dict, what: str):
    assert a.keys() == b.keys(), f"{what}: names differ: {sorted(a.keys() ^ b.keys())[:5]}"
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{what}: {k} differs"


@pytest.mark.parametrize("name", list(MODELS))
def test_export_is_bitwise_and_loads_in_transformers(name, hf_models, converted, tmp_path):
    original_file = load_file(hf_models[name] / "model.safetensors")
    original_model = _hf_state(hf_models[name])
    for tp, pp in LAYOUTS:
        out = tmp_path / f"hf_tp{tp}pp{pp}"
        megarlhf_to_hf(converted[name][(tp, pp)], out)
        _assert_same_tensors(load_file(out / "model.safetensors"), original_file, f"{out}")
        _assert_same_tensors(_hf_state(out), original_model, f"transformers from {out}")
    exported = json.loads((out / "config.json").read_text())
    original = json.loads((hf_models[name] / "config.json").read_text())
    for key in ("model_type", "vocab_size", "tie_word_embeddings", "architectures"):
        assert exported[key] == original[key], key


@pytest.mark.parametrize("name", list(MODELS))
def test_reshard_round_trip_is_bitwise(name, converted, tmp_path):
    src = converted[name][(2, 2)]
    reshard(src, tmp_path / "t1p1", tp=1, pp=1)
    reshard(tmp_path / "t1p1", tmp_path / "t2p2", tp=2, pp=2)
    back, orig = _rank_files(tmp_path / "t2p2"), _rank_files(src)
    assert back.keys() == orig.keys() == {(t, p) for t in range(2) for p in range(2)}
    for rank in orig:
        _assert_same_tensors(back[rank], orig[rank], f"rank {rank}")
    # The intermediate TP1.PP1 equals the checkpoint converted directly at TP1.PP1.
    direct = _rank_files(converted[name][(1, 1)])
    _assert_same_tensors(_rank_files(tmp_path / "t1p1")[(0, 0)], direct[(0, 0)], "t1p1")
    assert read_meta(tmp_path / "t2p2") == read_meta(src)


def _fake_state(tp, tp_rank, pp, pp_rank):
    """Coordinates of one rank without process groups (enough to build and save a stage)."""
    return ParallelState(tp_size=tp, pp_size=pp, tp_rank=tp_rank, pp_rank=pp_rank)


@pytest.mark.parametrize("name", list(MODELS))
def test_model_state_dict_saves_into_the_same_files(name, converted, tmp_path):
    """GPTModel's state_dict (global names, local shapes) is exactly the format's content: load
    each rank's stage strictly into the model, save its state_dict, get the same files back."""
    src = converted[name][(2, 2)]
    cfg = read_meta(src).model
    for t in range(2):
        for p in range(2):
            model = GPTModel(cfg, _fake_state(2, t, 2, p))
            sd = load_model_shard(src, tp=2, tp_rank=t, pp=2, pp_rank=p, strict_layout=True)
            model.load_state_dict(sd, strict=True)
            save_model_shard(tmp_path, model.state_dict(), cfg, tp=2, tp_rank=t, pp=2, pp_rank=p)
    saved, orig = _rank_files(tmp_path), _rank_files(src)
    for rank in orig:
        _assert_same_tensors(saved[rank], orig[rank], f"rank {rank}")
    assert read_meta(tmp_path) == read_meta(src)


def test_load_reshards_any_layout_and_strict_refuses(converted):
    ckpts = converted["llama_untied"]
    # Every layout's rank t, p state equals the one converted straight at that layout.
    for target in LAYOUTS:
        expected = _rank_files(ckpts[target])
        for source in LAYOUTS:
            for (t, p), tensors in expected.items():
                got = load_model_shard(
                    ckpts[source], tp=target[0], tp_rank=t, pp=target[1], pp_rank=p
                )
                _assert_same_tensors(got, tensors, f"{source} loaded at {target} rank {t},{p}")
    with pytest.raises(CheckpointError, match=r"tp=2, pp=2 .*tp=1, pp=1.*--reshard"):
        load_model_shard(ckpts[(2, 2)], tp=1, tp_rank=0, pp=1, pp_rank=0, strict_layout=True)


def test_save_refuses_a_wrong_state_dict(converted, tmp_path):
    # Uneven heads (4q+2kv | 2q+1kv): rank 0's shards are not rank 1's shapes.
    src = converted["llama_untied"][(2, 1)]
    cfg = read_meta(src).model
    sd = load_model_shard(src, tp=2, tp_rank=0, pp=1, pp_rank=0)
    with pytest.raises(CheckpointError, match="not tp rank 1/2's shard"):
        save_model_shard(tmp_path, sd, cfg, tp=2, tp_rank=1, pp=1, pp_rank=0)
    del sd["final_norm.weight"]
    with pytest.raises(CheckpointError, match=r"missing \['final_norm.weight'\]"):
        save_model_shard(tmp_path, sd, cfg, tp=2, tp_rank=0, pp=1, pp_rank=0)


def test_sharded_hf_output_and_bin_input(hf_models, converted, tmp_path):
    """Export split into several files with an index; .bin input converts like safetensors."""
    name = "llama_untied"
    out = tmp_path / "sharded"
    megarlhf_to_hf(converted[name][(1, 2)], out, max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    _assert_same_tensors(_hf_state(out), _hf_state(hf_models[name]), "sharded export")

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((hf_models[name] / "config.json").read_text())
    torch.save(load_file(hf_models[name] / "model.safetensors"), bin_dir / "pytorch_model.bin")
    hf_to_megarlhf(bin_dir, tmp_path / "from_bin", tp=2, pp=2)
    from_sharded = tmp_path / "from_sharded"
    hf_to_megarlhf(out, from_sharded, tp=2, pp=2)
    for ckpt in (tmp_path / "from_bin", from_sharded):
        files, orig = _rank_files(ckpt), _rank_files(converted[name][(2, 2)])
        for rank in orig:
            _assert_same_tensors(files[rank], orig[rank], f"{ckpt} rank {rank}")


def test_bf16_checkpoint_stays_bf16_and_bitwise(hf_models, tmp_path):
    from safetensors.torch import save_file

    src = hf_models["gpt2"]
    bf16 = tmp_path / "bf16"
    bf16.mkdir()
    cfg = json.loads((src / "config.json").read_text()) | {"dtype": "bfloat16"}
    (bf16 / "config.json").write_text(json.dumps(cfg))
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(src / "model.safetensors").items()}
    save_file(tensors, bf16 / "model.safetensors", metadata={"format": "pt"})
    hf_to_megarlhf(bf16, tmp_path / "ckpt", tp=2, pp=2)
    assert read_meta(tmp_path / "ckpt").model.dtype == "bf16"
    megarlhf_to_hf(tmp_path / "ckpt", tmp_path / "out")
    _assert_same_tensors(load_file(tmp_path / "out" / "model.safetensors"), tensors, "bf16")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
