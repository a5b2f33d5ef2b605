"""Model-shard loads check each file they read against its recorded checksum: converted models
(sidecars written by ModelShardsWriter and save_model_shard), model shards inside a training
checkpoint (its COMPLETE.json, `step_N/` and `step_N/critic/`), `checkpoint.init_from` and
`ppo.reward_model` (both `load_init_weights`). Directories written before checksums still load.
DeepSpeed's files: which a rank reads on resume (the files verified there)."""

import json
import logging

import pytest
import torch

from megarlhf.checkpoint import atomic
from megarlhf.checkpoint.errors import CorruptCheckpointError
from megarlhf.checkpoint.init_from import load_init_weights
from megarlhf.checkpoint.model_shards import (
    ModelShardsReader,
    ModelShardsWriter,
    load_model_shard,
    rank_file,
    read_meta,
    save_model_shard,
)
from megarlhf.checkpoint.training import _deepspeed_reads
from megarlhf.config import ModelConfig
from megarlhf.model.gpt import GPTModel
from megarlhf.parallel.state import single_process_state
from tests.checkpoint.test_checksums import _flip


def _cfg(head: str = "lm") -> ModelConfig:
    return ModelConfig(
        family="gpt2", vocab_size=50, hidden_size=32, num_layers=2, num_heads=4,
        max_seq_len=32, make_vocab_size_divisible_by=8, head=head,
    )  # fmt: skip


def _save(path, head: str = "lm", **kw):
    cfg = _cfg(head)
    model = GPTModel(cfg, single_process_state(), seed=3)
    save_model_shard(path, model.state_dict(), cfg, tp=1, tp_rank=0, pp=1, pp_rank=0, **kw)
    return model


def _corrupt_data(path) -> None:
    _flip(path, offset=path.stat().st_size - 200, n=8)  # tensor bytes, not the header


def _load(path):
    return load_model_shard(path, tp=1, tp_rank=0, pp=1, pp_rank=0)


def test_standalone_shard_records_a_sidecar_and_corruption_is_refused(tmp_path):
    model = _save(tmp_path)
    sidecar = json.loads((tmp_path / "model" / "checksums.tp00_pp00.json").read_text())
    assert sorted(sidecar["files"]) == ["meta.json", "tp00_pp00.safetensors"]
    got = _load(tmp_path)
    assert all(torch.equal(got[n], p) for n, p in model.state_dict().items())
    path = rank_file(tmp_path, 0, 0)
    _corrupt_data(path)
    with pytest.raises(
        CorruptCheckpointError, match=rf"^{path}: checksum mismatch \(recorded xxh3"
    ):
        _load(tmp_path)


def test_meta_json_changed_in_place_is_refused(tmp_path):
    _save(tmp_path)
    meta = tmp_path / "model" / "meta.json"
    text = meta.read_text()
    assert '"num_layers": 2' in text
    meta.write_text(text.replace('"num_layers": 2', '"num_layers": 3'))  # parses, same size
    with pytest.raises(CorruptCheckpointError, match=rf"^{meta}: checksum mismatch"):
        read_meta(tmp_path)


def test_directory_without_checksums_loads_with_a_debug_line(tmp_path, caplog):
    _save(tmp_path, record_checksums=False)
    assert not list((tmp_path / "model").glob("checksums*"))
    _corrupt_data(rank_file(tmp_path, 0, 0))  # undetectable, as before checksums
    with caplog.at_level(logging.DEBUG, logger="megarlhf.checkpoint.model_shards"):
        _load(tmp_path)
    assert "no checksums recorded (written before checksums)" in caplog.text


def test_unreadable_sidecar_is_refused(tmp_path):
    _save(tmp_path)
    (tmp_path / "model" / "checksums.tp00_pp00.json").write_text("{not json")
    with pytest.raises(CorruptCheckpointError, match="checksums.tp00_pp00.json: unreadable"):
        _load(tmp_path)


def test_writer_records_checksums_json_and_replaces_stale_sidecars(tmp_path):
    src = tmp_path / "src"
    _save(src)
    out = tmp_path / "out"
    (out / "model").mkdir(parents=True)
    (out / "model" / "checksums.tp00_pp00.json").write_text("{}")  # stale, from an older save
    with ModelShardsReader(src) as reader:
        writer = ModelShardsWriter(
            out, reader.cfg, 2, 1, {n: reader.info(n) for n in reader.names()}
        )
        for name in reader.names():
            writer.write(name, reader.full_tensor(name))
        writer.close()
    assert sorted(p.name for p in (out / "model").iterdir()) == [
        "checksums.json", "meta.json", "tp00_pp00.safetensors", "tp01_pp00.safetensors",
    ]  # fmt: skip
    sums = json.loads((out / "model" / "checksums.json").read_text())["files"]
    assert sums["tp01_pp00.safetensors"]["size"] == rank_file(out, 1, 0).stat().st_size
    got, want = _load(out), _load(src)
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in got)
    _corrupt_data(rank_file(out, 1, 0))
    with ModelShardsReader(out) as reader, pytest.raises(CorruptCheckpointError, match="tp01_pp00"):
        reader.full_tensor("final_norm.weight")


def _training_checkpoint(root):
    """A step dir laid out as training writes it: shards under model/ and critic/model/, their
    checksums only in COMPLETE.json."""

    def write(tmp):
        files = []
        for sub, head in (("", "lm"), ("critic", "scalar")):
            _save(tmp / sub if sub else tmp, head, record_checksums=False)
            files += [rank_file(tmp / sub, 0, 0), tmp / sub / "model" / "meta.json"]
        return files

    return atomic.save_checkpoint(root, 5, write)


def test_shards_in_a_training_checkpoint_use_its_manifest(tmp_path):
    step = _training_checkpoint(tmp_path)
    assert not list(step.rglob("checksums*.json"))
    model = GPTModel(_cfg(), single_process_state(), seed=9)
    load_init_weights(model, step, single_process_state())  # checkpoint.init_from
    critic = GPTModel(_cfg("scalar"), single_process_state(), seed=9)
    load_init_weights(critic, step / "critic", single_process_state())
    _corrupt_data(rank_file(step / "critic", 0, 0))
    with pytest.raises(CorruptCheckpointError, match=f"{step}/critic/model/tp00_pp00.safetensors"):
        load_init_weights(critic, step / "critic", single_process_state())
    load_init_weights(model, step, single_process_state())  # the other model is intact


def test_corrupt_reward_model_is_refused(tmp_path):
    """ppo.reward_model and ppo.critic_init load through load_init_weights."""
    _save(tmp_path / "rm", head="scalar")
    _corrupt_data(rank_file(tmp_path / "rm", 0, 0))
    rm = GPTModel(_cfg("scalar"), single_process_state(), seed=1)
    before = {n: p.clone() for n, p in rm.named_parameters()}
    with pytest.raises(CorruptCheckpointError, match="rm/model/tp00_pp00.safetensors: checksum"):
        load_init_weights(rm, tmp_path / "rm", single_process_state())
    assert all(torch.equal(before[n], p) for n, p in rm.named_parameters())  # nothing copied


def test_files_a_rank_reads_on_resume():
    files = [
        "deepspeed/state/mp_rank_00_model_states.pt",
        "deepspeed/state/mp_rank_01_model_states.pt",
        "deepspeed/state/zero_pp_rank_0_mp_rank_01_optim_states.pt",
        "deepspeed/state/zero_pp_rank_1_mp_rank_01_optim_states.pt",
        "deepspeed/state/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "deepspeed/zero_to_fp32.py",
        "critic/deepspeed/state/mp_rank_01_model_states.pt",
        "critic/deepspeed/state/zero_pp_rank_1_mp_rank_01_model_states.pt",  # ZeRO-3
        "model/tp01_pp00.safetensors",
    ]
    assert _deepspeed_reads(files, "", dp_rank=1, mp_rank=1, every_dp=False) == [
        "deepspeed/state/mp_rank_01_model_states.pt",
        "deepspeed/state/zero_pp_rank_1_mp_rank_01_optim_states.pt",
    ]
    assert _deepspeed_reads(files, "", dp_rank=1, mp_rank=0, every_dp=False) == [
        "deepspeed/state/mp_rank_00_model_states.pt",
        "deepspeed/state/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    assert len(_deepspeed_reads(files, "", dp_rank=0, mp_rank=1, every_dp=True)) == 3  # elastic
    assert _deepspeed_reads(files, "critic/", dp_rank=1, mp_rank=1, every_dp=False) == files[6:8]
