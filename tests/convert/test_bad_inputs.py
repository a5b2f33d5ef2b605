"""Bad inputs give a clear error naming the key or file, and leave no output folder behind:
truncated safetensors (HF side and megarlhf side), a config that disagrees with its tensors, an
unsupported model_type or setting, an existing output. The CLI turns them into exit code 1."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megarlhf.checkpoint.model_shards import CheckpointError, rank_file
from megarlhf.convert import ConversionError, hf_to_megarlhf, megarlhf_to_hf, reshard
from tools.convert_hf import main

ROOT = Path(__file__).parents[2]


def _copy(src: Path, dst: Path, **config_changes) -> Path:
    shutil.copytree(src, dst)
    if config_changes:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config_changes)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _assert_nothing_written(out: Path):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def _truncate(path: Path, keep: int):
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:keep])


@pytest.mark.parametrize("keep", [5, 200, -100], ids=["in-length", "in-header", "in-data"])
def test_truncated_hf_safetensors(hf_models, tmp_path, keep):
    bad = _copy(hf_models["llama_gqa_tied"], tmp_path / "bad")
    _truncate(bad / "model.safetensors", keep)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unreadable safetensors.*trunc"):
        hf_to_megarlhf(bad, out, tp=2, pp=2)
    _assert_nothing_written(out)


def test_truncated_rank_file(converted, tmp_path):
    bad = _copy(converted["gpt2"][(2, 2)], tmp_path / "bad")
    _truncate(rank_file(bad, 1, 1), -64)
    for convert in (megarlhf_to_hf, lambda s, o: reshard(s, o, tp=1, pp=1)):
        out = tmp_path / "out"
        # Caught by the rank file's recorded checksum where it has one, else by its size.
        match = r"tp01_pp01\.safetensors: (unreadable|checksum mismatch.*corrupt)"
        with pytest.raises(CheckpointError, match=match):
            convert(bad, out)
        _assert_nothing_written(out)


@pytest.mark.parametrize(
    "name, change, message",
    [
        ("gpt2", {"n_embd": 64}, r"shape mismatch for transformer\.wte\.weight.*\[300, 32\].*64"),
        ("gpt2", {"vocab_size": 320}, r"shape mismatch for transformer\.wte\.weight"),
        ("gpt2", {"n_layer": 4}, r"missing key transformer\.h\.3\.ln_1\.weight.*n_layer=4"),
        ("llama_untied", {"num_hidden_layers": 2}, r"not consumed.*model\.layers\.2\."),
        ("llama_untied", {"num_key_value_heads": 6}, r"shape mismatch for .*k_proj\.weight"),
        (
            "llama_untied",
            {"tie_word_embeddings": True},
            r"tie_word_embeddings=true but lm_head\.weight differs from model\.embed_tokens",
        ),
        ("llama_gqa_tied", {"tie_word_embeddings": False}, r"missing key lm_head\.weight"),
        ("llama_gqa_tied", {"intermediate_size": 96}, r"shape mismatch for .*gate_proj\.weight"),
    ],
)
def test_config_disagreeing_with_tensors(hf_models, tmp_path, name, change, message):
    bad = _copy(hf_models[name], tmp_path / "bad", **change)
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=message):
        hf_to_megarlhf(bad, out, tp=2, pp=2)
    _assert_nothing_written(out)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "bert"}, r"model_type 'bert' is not supported \(supported: gpt2, llama"),
        ({"hidden_act": "gelu"}, r"hidden_act='gelu' is not supported"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, r"rope_type='yarn'"),
    ],
)
def test_unsupported_model(hf_models, tmp_path, change, message):
    bad = _copy(hf_models["llama_untied"], tmp_path / "bad", **change)
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=message):
        hf_to_megarlhf(bad, out)
    _assert_nothing_written(out)


def test_existing_output_needs_force(hf_models, converted, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(ConversionError, match="already exists"):
        hf_to_megarlhf(hf_models["gpt2"], out)
    assert (out / "keep").exists()
    assert main(["--reshard", str(converted["gpt2"][(1, 1)]), str(out), "--force"]) == 0
    assert not (out / "keep").exists() and (out / "model" / "meta.json").exists()


def test_cli_modes_and_exit_code(hf_models, tmp_path, capsys):
    hf = hf_models["llama_untied"]
    ckpt, hf_out = tmp_path / "ckpt", tmp_path / "hf_out"
    assert main(["--hf-to-megarlhf", str(hf), str(ckpt), "--tp", "2", "--pp", "2"]) == 0
    assert main(["--reshard", str(ckpt), str(tmp_path / "t1"), "--tp", "1"]) == 0
    assert main(["--megarlhf-to-hf", str(tmp_path / "t1"), str(hf_out)]) == 0
    assert "peak RSS" in capsys.readouterr().out
    got, want = load_file(hf_out / "model.safetensors"), load_file(hf / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)

    # As a script, in its own process: an error is one line on stderr and exit code 1.
    bad = _copy(hf, tmp_path / "bad", model_type="bert")
    proc = subprocess.run(
        [sys.executable, "tools/convert_hf.py", "--hf-to-megarlhf", str(bad), str(tmp_path / "o")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert "convert_hf: error: " in proc.stderr and "model_type 'bert'" in proc.stderr
    _assert_nothing_written(tmp_path / "o")


@pytest.mark.parametrize(
    "tp, pp, message",
    [(4, 1, r"tp=4 exceeds model.num_kv_heads=2"), (1, 4, r"pp=4 exceeds model.num_layers=3")],
)
def test_impossible_layout(hf_models, converted, tmp_path, tp, pp, message):
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=rf"cannot lay this model out.*{message}"):
        hf_to_megarlhf(hf_models["llama_gqa_tied"], out, tp=tp, pp=pp)
    _assert_nothing_written(out)
    with pytest.raises(CheckpointError, match=message):
        reshard(converted["llama_gqa_tied"][(1, 1)], out, tp=tp, pp=pp)
    _assert_nothing_written(out)
