"""megarlhf LoRA checkpoint -> a PEFT adapter folder (`peft.PeftModel.from_pretrained` loads it on
the Hugging Face base model).

    OUT/adapter_config.json         written by peft's own LoraConfig (r, lora_alpha, lora_dropout,
                                    target_modules, fan_in_fan_out for GPT-2's Conv1D, ...)
    OUT/adapter_model.safetensors   base_model.model.<HF module>.lora_A.weight [r, in] and
                                    .lora_B.weight [out, r] for every adapted module

Our factors map one to one onto PEFT's, since both compute W x + (alpha / r) B A drop(x) with A
[r, in] and B [out, r] in the [out, in] convention (PEFT keeps that convention for Conv1D too and
only transposes when merging). Fused linears split along B's rows: our qkv adapter on LLaMA
becomes q_proj, k_proj and v_proj adapters sharing one A (B's q | k | v rows), fc1 becomes
gate_proj and up_proj; PEFT's per-module A's are then equal copies, which is the same update.
GPT-2's c_attn is fused in HF too (one module). The module names come from the conversion tables
(tables.py), the same rows `--megarlhf-to-hf` writes the base with.

Only language models: a scalar head (reward model, critic) also trains its head, which PEFT would
carry as `modules_to_save` on `*ForSequenceClassification`; export those merged instead
(`--megarlhf-to-hf`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from safetensors.torch import save_file

from megarlhf.checkpoint.model_shards import MODEL_SUBDIR, ModelShardsReader
from megarlhf.convert.convert import HF_CONFIG_FILE, lineage, staged_output_dir
from megarlhf.convert.hf_config import ConversionError
from megarlhf.convert.tables import TABLES, expand
from megarlhf.model.gpt import adapted_weight, lora_sharding_plan

ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def _base_name(ckpt_dir: Path) -> str:
    """What PEFT records as `base_model_name_or_path`: the HF model the base was imported from
    (its config's `_name_or_path`) when known, else the base checkpoint's path."""
    for d in lineage(ckpt_dir):
        hf = d / MODEL_SUBDIR / HF_CONFIG_FILE
        if hf.is_file():
            name = json.loads(hf.read_text()).get("_name_or_path")
            if name:
                return str(name)
    chain = lineage(ckpt_dir)
    return str(chain[-1]) if len(chain) > 1 else str(ckpt_dir)


def peft_tensors(reader: ModelShardsReader) -> tuple[dict, list[str]]:
    """({PEFT key: tensor}, target module suffixes) of a LoRA directory's adapters."""
    cfg = reader.meta.adapters.model_config(reader.cfg)
    table = TABLES[cfg.family]
    rows = {m.ours: m for m in expand(table, cfg, table.prefixes[0])}
    tensors, targets = {}, set()
    for a_name in (n for n in lora_sharding_plan(cfg, 1) if n.endswith(".a")):
        row = rows[adapted_weight(a_name)]
        a, b = reader.stored_tensor(a_name), reader.stored_tensor(a_name[:-1] + "b")
        parts = b.split(list(row.split), dim=0) if row.split else [b]
        for hf_name, b_part in zip(row.hf, parts, strict=True):
            module = hf_name.removesuffix(".weight")
            tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a.clone()  # one copy per module
            tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b_part.contiguous()
            # "model.layers.3.self_attn.q_proj" -> "self_attn.q_proj" (PEFT matches suffixes;
            # GPT-2's attn.c_proj and mlp.c_proj need their parent to tell them apart).
            targets.add(re.sub(r"^.*?\.\d+\.", "", module))
    return tensors, sorted(targets)


def megarlhf_to_peft(
    ckpt_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False, base_model=None
) -> dict:
    """Write a LoRA checkpoint's adapters as a PEFT adapter folder.

    Args:
        ckpt_dir: a megarlhf LoRA checkpoint (model.lora.rank > 0), language-model head.
        out_dir: the adapter folder to create.
        overwrite: replace an existing `out_dir`.
        base_model: `base_model_name_or_path` to record (default: see `_base_name`).
    Returns:
        The adapter_config.json dict written.
    """
    try:
        from peft import LoraConfig
    except ImportError:
        raise ConversionError("--peft needs peft (pip install -e .[peft])") from None
    ckpt_dir = Path(ckpt_dir)
    with ModelShardsReader(ckpt_dir) as reader:
        adapters = reader.meta.adapters
        if adapters is None:
            raise ConversionError(
                f"{ckpt_dir}: not a LoRA checkpoint (no adapters); --megarlhf-to-hf exports it"
            )
        if reader.cfg.head != "lm":
            raise ConversionError(
                f"{ckpt_dir}: a scalar-head LoRA model trains its head too; export it merged "
                "with --megarlhf-to-hf (PEFT adapters are written for language models only)"
            )
        lora = adapters.lora
        with staged_output_dir(out_dir, overwrite) as tmp:
            tensors, targets = peft_tensors(reader)
            save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
            config = LoraConfig(
                r=lora.rank,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=targets,
                fan_in_fan_out=reader.cfg.family == "gpt2",  # HF GPT-2 linears are Conv1D
                bias="none",
                task_type="CAUSAL_LM",
                base_model_name_or_path=base_model or _base_name(ckpt_dir),
                inference_mode=True,
            )
            config.save_pretrained(str(tmp))
            return json.loads((tmp / "adapter_config.json").read_text())
