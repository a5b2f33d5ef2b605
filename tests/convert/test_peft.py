"""LoRA out to Hugging Face: our adapters -> `tools/convert_hf.py --peft` folder ->
`peft.PeftModel` on the HF base gives our adapted model's logits (fp32); `--megarlhf-to-hf` of the
LoRA checkpoint gives the merged model, equal to PEFT's own `merge_and_unload`.

The base is a random-init transformers model imported at TP=2 (the LoRA model runs at TP=1, so
the base is re-sharded on the way); every B is set non-zero, as B = 0 would hide any mix-up."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from megarlhf.checkpoint.init_from import load_init_weights
from megarlhf.checkpoint.lora_shards import LoRABase
from megarlhf.checkpoint.model_shards import read_meta, save_model_shard
from megarlhf.config.model import LoRAConfig
from megarlhf.convert import ConversionError, hf_to_megarlhf, megarlhf_to_hf
from megarlhf.model.gpt import GPTModel
from megarlhf.parallel.state import single_process_state
from tests.convert.conftest import VOCAB
from tests.model.test_lora import randomize_adapters
from tools import convert_hf

peft = pytest.importorskip("peft")
RTOL = 1e-5

CASES = {
    "gpt2": LoRAConfig(rank=4, alpha=8.0, dropout=0.1),
    "llama_untied": LoRAConfig(rank=3, alpha=5.0, target_modules=["qkv", "fc1", "fc2"]),
    "llama_gqa_tied": LoRAConfig(rank=2, alpha=2.0, target_modules=["proj"]),
}


def _lora_checkpoint(hf_dir, tmp_path, lora: LoRAConfig):
    base = tmp_path / "base"
    hf_to_megarlhf(hf_dir, base, tp=2)
    cfg = dataclasses.replace(read_meta(base).model, lora=lora)
    ps = single_process_state()
    model = GPTModel(cfg, ps, seed=5)
    load_init_weights(model, base, ps)
    randomize_adapters(model)
    ckpt = tmp_path / "lora"
    save_model_shard(
        ckpt, model.state_dict(), cfg, tp=1, tp_rank=0, pp=1, pp_rank=0,
        lora_base=LoRABase.of(model),
    )  # fmt: skip
    return model.eval(), ckpt


@pytest.mark.parametrize("name", list(CASES))
def test_peft_round_trip_gives_our_logits(hf_models, tmp_path, name):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, ckpt = _lora_checkpoint(hf_models[name], tmp_path, CASES[name])
    assert convert_hf.main(["--peft", str(ckpt), str(tmp_path / "peft")]) == 0
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["r"] == CASES[name].rank and config["lora_alpha"] == CASES[name].alpha
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids)[..., :VOCAB]
        hf = AutoModelForCausalLM.from_pretrained(hf_models[name], dtype=torch.float32)
        adapted = PeftModel.from_pretrained(hf, tmp_path / "peft").eval()
        theirs = adapted(input_ids=ids).logits
        with adapted.disable_adapter():
            plain = adapted(input_ids=ids).logits
    scale = theirs.abs().max().item()
    torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=RTOL * scale)
    assert (plain - theirs).abs().max() > 100 * RTOL * scale  # the adapters do change it

    # The merged export loads in transformers alone and equals PEFT's own merge.
    megarlhf_to_hf(ckpt, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, ours, rtol=RTOL, atol=RTOL * scale)
    peft_merged = adapted.merge_and_unload().state_dict()
    for key, t in merged.state_dict().items():
        torch.testing.assert_close(t, peft_merged[key], rtol=1e-6, atol=1e-6)


def test_peft_refuses_what_it_cannot_write(hf_models, tmp_path):
    from megarlhf.convert import megarlhf_to_peft

    hf_to_megarlhf(hf_models["gpt2"], tmp_path / "plain")
    with pytest.raises(ConversionError, match="not a LoRA checkpoint"):
        megarlhf_to_peft(tmp_path / "plain", tmp_path / "out")
    assert convert_hf.main(["--peft", str(tmp_path / "plain"), str(tmp_path / "o")]) == 1
    # A LoRA reward model (its fresh head trains too): exported merged, not as PEFT.
    cfg = dataclasses.replace(
        read_meta(tmp_path / "plain").model, head="scalar", lora=LoRAConfig(rank=2)
    )
    rm = GPTModel(cfg, single_process_state(), seed=1)
    load_init_weights(rm, tmp_path / "plain", single_process_state())
    save_model_shard(
        tmp_path / "rm", rm.state_dict(), cfg, tp=1, tp_rank=0, pp=1, pp_rank=0,
        lora_base=LoRABase.of(rm),
    )  # fmt: skip
    with pytest.raises(ConversionError, match="export it merged"):
        megarlhf_to_peft(tmp_path / "rm", tmp_path / "out")
