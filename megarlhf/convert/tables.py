"""Declarative key-mapping tables between Hugging Face parameter names and megarlhf full names.

One `FamilyTable` per model family lists, row by row, which HF tensor(s) make each megarlhf full
(unsharded, unpadded) parameter:

- `hf`: one or more HF names. Several names are fused along dim 0 in the listed order (LLaMA's
  q_proj|k_proj|v_proj -> qkv, gate_proj|up_proj -> fc1); `split` gives the part sizes to cut them
  apart again on export.
- `transform`: "conv1d" for GPT-2's Conv1D weights, stored [in, out]: transposed to our [out, in].
  GPT-2's fused `c_attn` [h, 3h] transposes to [3h, h] whose rows are already q|k|v, our layout.
- `shape`: the full shape the config implies, checked against every tensor before anything is
  written (a config that disagrees with its tensors is an error naming the key).
- `when`: "untied" rows exist only for language models with a separate output layer, "scalar"
  rows only for scalar-head models (reward model, critic: HF `*ForSequenceClassification`, whose
  `score.weight` [n, h] is our `head.weight`). Our `head.bias` has no HF tensor (HF's score layer
  has none): `score_head.py` makes it on import and decides what becomes of it on export.

The HF names carry `{p}` for the model prefix ("transformer." or "" for GPT-2 checkpoints saved from
`GPT2Model`, "model." for LLaMA) and `{i}` for the layer index. No permutation of q/k rows is needed
for LLaMA: our RoPE uses HF's rotate-half convention on HF-ordered weights.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from megarlhf.config import ModelConfig
from megarlhf.convert.hf_config import ConversionError

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Row:
    """One megarlhf parameter and the HF tensor(s) it is made of."""

    ours: str
    hf: tuple[str, ...]
    shape: Callable[[ModelConfig], Shape]
    transform: str = "none"
    split: Callable[[ModelConfig], list[int]] | None = None
    # "always", "untied" (LM head with its own output layer) or "scalar" (scalar head).
    when: str = "always"


@dataclass(frozen=True)
class FamilyTable:
    family: str
    # Candidate values of `{p}`, detected from which embedding name the checkpoint has.
    prefixes: tuple[str, ...]
    # HF name (with {p}) whose presence identifies the prefix.
    probe: str
    rows: tuple[Row, ...]
    # HF tensors that are not parameters (buffers of old checkpoints): consumed and dropped.
    ignore: tuple[str, ...] = ()
    # HF name of a tied output layer that some checkpoints store anyway, and the row it copies.
    tied_copy: tuple[str, str] | None = None


@dataclass(frozen=True)
class KeyMapping:
    """A table row for one layer (names resolved)."""

    ours: str
    hf: tuple[str, ...]
    shape: Shape
    transform: str
    split: tuple[int, ...] | None


def _h(c: ModelConfig) -> Shape:
    return (c.hidden_size,)


def _hh(c: ModelConfig) -> Shape:
    return (c.hidden_size, c.hidden_size)


def _vocab(c: ModelConfig) -> Shape:
    return (c.vocab_size, c.hidden_size)


def _score(c: ModelConfig) -> Shape:
    return (c.num_head_outputs, c.hidden_size)


def _qkv_rows(c: ModelConfig) -> int:
    return (c.num_heads + 2 * c.num_kv_heads) * c.head_dim


def _qkv_split(c: ModelConfig) -> list[int]:
    return [c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim]


GPT2_TABLE = FamilyTable(
    family="gpt2",
    prefixes=("transformer.", ""),
    probe="{p}wte.weight",
    rows=(
        Row("embedding.word.weight", ("{p}wte.weight",), _vocab),
        Row(
            "embedding.position.weight",
            ("{p}wpe.weight",),
            lambda c: (c.max_seq_len, c.hidden_size),
        ),
        Row("layers.{i}.input_norm.weight", ("{p}h.{i}.ln_1.weight",), _h),
        Row("layers.{i}.input_norm.bias", ("{p}h.{i}.ln_1.bias",), _h),
        Row(
            "layers.{i}.attention.qkv.weight",
            ("{p}h.{i}.attn.c_attn.weight",),
            lambda c: (_qkv_rows(c), c.hidden_size),
            "conv1d",
        ),
        Row(
            "layers.{i}.attention.qkv.bias",
            ("{p}h.{i}.attn.c_attn.bias",),
            lambda c: (_qkv_rows(c),),
        ),
        Row("layers.{i}.attention.proj.weight", ("{p}h.{i}.attn.c_proj.weight",), _hh, "conv1d"),
        Row("layers.{i}.attention.proj.bias", ("{p}h.{i}.attn.c_proj.bias",), _h),
        Row("layers.{i}.post_attention_norm.weight", ("{p}h.{i}.ln_2.weight",), _h),
        Row("layers.{i}.post_attention_norm.bias", ("{p}h.{i}.ln_2.bias",), _h),
        Row(
            "layers.{i}.mlp.fc1.weight",
            ("{p}h.{i}.mlp.c_fc.weight",),
            lambda c: (c.ffn_hidden_size, c.hidden_size),
            "conv1d",
        ),
        Row("layers.{i}.mlp.fc1.bias", ("{p}h.{i}.mlp.c_fc.bias",), lambda c: (c.ffn_hidden_size,)),
        Row(
            "layers.{i}.mlp.fc2.weight",
            ("{p}h.{i}.mlp.c_proj.weight",),
            lambda c: (c.hidden_size, c.ffn_hidden_size),
            "conv1d",
        ),
        Row("layers.{i}.mlp.fc2.bias", ("{p}h.{i}.mlp.c_proj.bias",), _h),
        Row("final_norm.weight", ("{p}ln_f.weight",), _h),
        Row("final_norm.bias", ("{p}ln_f.bias",), _h),
        Row("output.weight", ("lm_head.weight",), _vocab, when="untied"),
        Row("head.weight", ("score.weight",), _score, when="scalar"),
    ),
    # Causal-mask buffers that old GPT-2 checkpoints saved as tensors.
    ignore=(r"(transformer\.)?h\.\d+\.attn\.(masked_)?bias",),
    tied_copy=("lm_head.weight", "embedding.word.weight"),
)

LLAMA_TABLE = FamilyTable(
    family="llama",
    prefixes=("model.",),
    probe="{p}embed_tokens.weight",
    rows=(
        Row("embedding.word.weight", ("{p}embed_tokens.weight",), _vocab),
        Row("layers.{i}.input_norm.weight", ("{p}layers.{i}.input_layernorm.weight",), _h),
        Row(
            "layers.{i}.attention.qkv.weight",
            (
                "{p}layers.{i}.self_attn.q_proj.weight",
                "{p}layers.{i}.self_attn.k_proj.weight",
                "{p}layers.{i}.self_attn.v_proj.weight",
            ),
            lambda c: (_qkv_rows(c), c.hidden_size),
            split=_qkv_split,
        ),
        Row(
            "layers.{i}.attention.proj.weight",
            ("{p}layers.{i}.self_attn.o_proj.weight",),
            lambda c: (c.hidden_size, c.num_heads * c.head_dim),
        ),
        Row(
            "layers.{i}.post_attention_norm.weight",
            ("{p}layers.{i}.post_attention_layernorm.weight",),
            _h,
        ),
        Row(
            "layers.{i}.mlp.fc1.weight",
            ("{p}layers.{i}.mlp.gate_proj.weight", "{p}layers.{i}.mlp.up_proj.weight"),
            lambda c: (2 * c.ffn_hidden_size, c.hidden_size),
            split=lambda c: [c.ffn_hidden_size, c.ffn_hidden_size],
        ),
        Row(
            "layers.{i}.mlp.fc2.weight",
            ("{p}layers.{i}.mlp.down_proj.weight",),
            lambda c: (c.hidden_size, c.ffn_hidden_size),
        ),
        Row("final_norm.weight", ("{p}norm.weight",), _h),
        Row("output.weight", ("lm_head.weight",), _vocab, when="untied"),
        Row("head.weight", ("score.weight",), _score, when="scalar"),
    ),
    # Rotary frequencies that old LLaMA checkpoints saved as tensors.
    ignore=(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",),
    tied_copy=("lm_head.weight", "embedding.word.weight"),
)

TABLES = {t.family: t for t in (GPT2_TABLE, LLAMA_TABLE)}


def detect_prefix(table: FamilyTable, hf_names: set[str], where: str) -> str:
    """The `{p}` value of a checkpoint, from which probe name it contains."""
    for p in table.prefixes:
        if table.probe.format(p=p) in hf_names:
            return p
    tried = [table.probe.format(p=p) for p in table.prefixes]
    raise ConversionError(f"{where}: missing key {tried[0]} (no {' or '.join(tried)} found)")


def expand(table: FamilyTable, cfg: ModelConfig, prefix: str) -> list[KeyMapping]:
    """The table's rows for every layer of `cfg`, in model order (embedding, layers, head)."""
    out = []
    for row in table.rows:
        if not _row_applies(row, cfg):
            continue
        layers = range(cfg.num_layers) if "{i}" in row.ours else [None]
        split = tuple(row.split(cfg)) if row.split else None
        if split is not None and len(split) != len(row.hf):
            raise AssertionError(
                f"table row {row.ours}: {len(row.hf)} HF names, {len(split)} parts"
            )
        for i in layers:
            out.append(
                KeyMapping(
                    ours=row.ours.format(i=i),
                    hf=tuple(h.format(p=prefix, i=i) for h in row.hf),
                    shape=row.shape(cfg),
                    transform=row.transform,
                    split=split,
                )
            )
    # Layer rows come out grouped by row; order them by layer so writes follow the model.
    return sorted(out, key=lambda m: _order_key(m.ours))


def _row_applies(row: Row, cfg: ModelConfig) -> bool:
    if row.when == "untied":
        return cfg.head == "lm" and not cfg.tie_embeddings
    if row.when == "scalar":
        return cfg.head == "scalar"
    return True


def _order_key(name: str) -> tuple[int, int]:
    m = re.match(r"layers\.(\d+)\.", name)
    if m:
        return (1, int(m.group(1)))
    return (0, 0) if name.startswith("embedding.") else (2, 0)


def is_ignored(table: FamilyTable, hf_name: str) -> bool:
    return any(re.fullmatch(pattern, hf_name) for pattern in table.ignore)


# ----------------------------------------------------------------------------- transforms


def hf_part_shape(mapping: KeyMapping, part: int) -> Shape:
    """Shape of HF tensor `mapping.hf[part]` implied by our full shape."""
    shape = list(mapping.shape)
    if mapping.split is not None:
        shape[0] = mapping.split[part]
    if mapping.transform == "conv1d":
        shape = shape[::-1]
    return tuple(shape)


def to_ours(mapping: KeyMapping, hf_tensors: list[torch.Tensor]) -> torch.Tensor:
    """Our full tensor from its HF parts (transpose Conv1D, fuse along dim 0)."""
    parts = [t.t() if mapping.transform == "conv1d" else t for t in hf_tensors]
    full = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    return full.contiguous()


def to_hf(mapping: KeyMapping, full: torch.Tensor) -> list[torch.Tensor]:
    """The HF tensors of our full tensor (inverse of `to_ours`)."""
    parts = list(full.split(list(mapping.split), dim=0)) if mapping.split else [full]
    return [(p.t() if mapping.transform == "conv1d" else p).contiguous() for p in parts]
