"""Conversions: Hugging Face folder -> megarlhf checkpoint, back, and megarlhf re-sharding.

Every conversion goes through megarlhf FULL tensors (unsharded, real vocabulary), one at a time:

    HF tensors --table--> full tensor --pad vocab, shard--> T x P rank files (streamed)
    rank files --unshard, unpad--> full tensor --table--> HF tensors (streamed)

so peak memory is about one full tensor (the largest is the word embedding), never the model.
Everything is checked before the first byte is written: every HF tensor is consumed (or is a known
buffer / tied copy), every megarlhf parameter is produced, and every shape matches the config.

Outputs are written into a temp folder beside the destination and renamed at the end, so an error
leaves no partial output. Besides the weights, an imported checkpoint keeps the HF `config.json` as
`model/hf_config.json` (token ids, model_type and other keys we do not model) and the tokenizer
files under `tokenizer/`; export and re-sharding carry both along.

Scalar-head models (reward models, critics) are HF `*ForSequenceClassification` models: the
`score` layer is a table row, the bias it lacks is handled by `score_head.py`.

LoRA checkpoints (adapters only, their base by reference) read as their merged model, so export
and re-sharding write merged weights W + (alpha / r) B A, a plain checkpoint; the HF config and
tokenizer files come from the first of the checkpoint and its bases that has them (`lineage`).
`peft_adapter.py` writes the adapters themselves as a PEFT folder instead.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from megarlhf.checkpoint.model_shards import (
    MODEL_SUBDIR,
    ModelShardsReader,
    ModelShardsWriter,
    read_meta,
)
from megarlhf.config import ModelConfig
from megarlhf.convert.hf_config import (
    ConversionError,
    config_table_for,
    hf_config_to_model_config,
    model_config_to_hf_config,
)
from megarlhf.convert.hf_io import HFWeights, HFWeightsWriter, copy_tokenizer_files, read_hf_config
from megarlhf.convert.score_head import (
    HEAD_BIAS,
    SCORE_BIAS_KEY,
    export_head_bias,
    imported_head_bias,
)
from megarlhf.convert.tables import (
    TABLES,
    KeyMapping,
    detect_prefix,
    expand,
    hf_part_shape,
    is_ignored,
    to_hf,
    to_ours,
)
from megarlhf.model.gpt import sharding_plan

TOKENIZER_SUBDIR = "tokenizer"
HF_CONFIG_FILE = "hf_config.json"
# Source dtypes -> ModelConfig.dtype when none is asked for (fp16 widens losslessly to fp32).
_DTYPE_OF = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp32"}


@contextmanager
def staged_output_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside `out`; rename it to `out` on success, delete it on error."""
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise ConversionError(f"{out}: already exists (pass overwrite / --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def lineage(ckpt_dir: str | Path) -> list[Path]:
    """`ckpt_dir`, then (a LoRA checkpoint) its base, the base's base, ... up to a plain one or
    the seeded initialization."""
    chain = [Path(ckpt_dir)]
    while True:
        adapters = read_meta(chain[-1]).adapters
        if adapters is None or adapters.base.path is None or len(chain) > 32:
            return chain
        chain.append(Path(adapters.base.path))


def _first_with(ckpt_dir: Path, rel: str) -> Path:
    """`<d>/<rel>` for the first d of `lineage(ckpt_dir)` that has it (else ckpt_dir's)."""
    for d in lineage(ckpt_dir):
        if (d / rel).exists():
            return d / rel
    return ckpt_dir / rel


# ----------------------------------------------------------------------------- HF -> megarlhf


def _check_hf_tensors(
    weights: HFWeights, mappings: list[KeyMapping], cfg: ModelConfig, hf_cfg: dict, table
) -> None:
    """Check names and shapes against the config before anything is written."""
    names = weights.names()
    hint = _layer_hint(hf_cfg)
    used: set[str] = set()
    for m in mappings:
        for k, hf_name in enumerate(m.hf):
            if hf_name not in names:
                raise ConversionError(
                    f"{weights.dir}: missing key {hf_name} (needed for {m.ours}; {hint})"
                )
            shape, _ = weights.info(hf_name)
            want = hf_part_shape(m, k)
            if shape != want:
                raise ConversionError(
                    f"{weights.file_of(hf_name)}: shape mismatch for {hf_name}: the file has "
                    f"{list(shape)}, config.json implies {list(want)}"
                )
            used.add(hf_name)
    tied = set()
    lm_tied = cfg.head == "lm" and cfg.tie_embeddings
    if lm_tied and table.tied_copy and table.tied_copy[0] in names:
        copy_name, source = table.tied_copy
        source_hf = next(m.hf[0] for m in mappings if m.ours == source)
        _check_tied_copy(weights, copy_name, source_hf)
        tied.add(copy_name)
    left = sorted(n for n in names - used - tied if not is_ignored(table, n))
    if left:
        raise ConversionError(
            f"{weights.dir}: {len(left)} tensor(s) not consumed by the {table.family} mapping, "
            f"e.g. {left[:4]} ({hint}); refusing to drop weights"
        )
    produced = {m.ours for m in mappings}
    expected = set(sharding_plan(cfg, 1)) - {HEAD_BIAS}  # the bias has no HF tensor
    if cfg.tie_embeddings:
        expected.discard("output.weight")
    if produced != expected:
        raise ConversionError(
            f"the {table.family} table and the model disagree: table-only "
            f"{sorted(produced - expected)[:4]}, model-only {sorted(expected - produced)[:4]}"
        )


def _layer_hint(hf_cfg: dict) -> str:
    keys = ("architectures", "num_hidden_layers", "n_layer", "tie_word_embeddings")
    said = ", ".join(f"{k}={hf_cfg[k]}" for k in keys if k in hf_cfg)
    return f"config.json says {said}" if said else "config.json"


def hf_to_megarlhf(
    hf_dir: str | Path,
    out_dir: str | Path,
    *,
    tp: int = 1,
    pp: int = 1,
    overwrite: bool = False,
    **overrides,
) -> ModelConfig:
    """Convert an HF model folder into a megarlhf checkpoint at layout (tp, pp).

    Args:
        hf_dir: folder with config.json and safetensors or .bin weights (sharded or not).
        out_dir: checkpoint folder to create.
        tp, pp: target layout.
        overwrite: replace an existing `out_dir`.
        **overrides: ModelConfig fields to set (dtype, make_vocab_size_divisible_by, max_seq_len).

    Returns:
        The ModelConfig written into the checkpoint.
    """
    hf_cfg = read_hf_config(hf_dir)
    table = TABLES[config_table_for(hf_cfg).family]
    with HFWeights(hf_dir) as weights, staged_output_dir(out_dir, overwrite) as tmp:
        prefix = detect_prefix(table, weights.names(), str(weights.dir))
        if "dtype" not in overrides:
            _, src_dtype = weights.info(table.probe.format(p=prefix))
            overrides["dtype"] = _DTYPE_OF.get(src_dtype, "fp32")
        cfg = hf_config_to_model_config(hf_cfg, **overrides)
        mappings = expand(table, cfg, prefix)
        _check_hf_tensors(weights, mappings, cfg, hf_cfg, table)
        infos = {m.ours: (m.shape, cfg.torch_dtype) for m in mappings}
        if cfg.head == "scalar":
            infos[HEAD_BIAS] = ((cfg.num_head_outputs,), cfg.torch_dtype)
        writer = ModelShardsWriter(tmp, cfg, tp, pp, infos)
        try:
            for m in mappings:
                full = to_ours(m, [weights.get(h) for h in m.hf]).to(cfg.torch_dtype)
                writer.write(m.ours, full)
                del full
            if cfg.head == "scalar":
                writer.write(HEAD_BIAS, imported_head_bias(hf_cfg, cfg))
            writer.close()
        except BaseException:
            writer.abort()
            raise
        (tmp / MODEL_SUBDIR / HF_CONFIG_FILE).write_text(json.dumps(hf_cfg, indent=2) + "\n")
        copy_tokenizer_files(hf_dir, tmp / TOKENIZER_SUBDIR)
    return cfg


def _check_tied_copy(weights: HFWeights, copy_name: str, source_name: str) -> None:
    if not torch.equal(weights.get(copy_name), weights.get(source_name)):
        raise ConversionError(
            f"{weights.file_of(copy_name)}: config.json says tie_word_embeddings=true but "
            f"{copy_name} differs from {source_name}; set tie_word_embeddings=false to keep both"
        )


# ----------------------------------------------------------------------------- megarlhf -> HF


def megarlhf_to_hf(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    max_shard_bytes: int = 5 * 2**30,
    score_bias: str = "error",
    pad_token_id: int | None = None,
) -> dict:
    """Convert a megarlhf checkpoint (any layout) into an HF folder `from_pretrained` loads.

    Args:
        ckpt_dir: the checkpoint (a language model, or a scalar head: *ForSequenceClassification).
        out_dir: HF folder to create.
        overwrite: replace an existing `out_dir`.
        max_shard_bytes: above this, several safetensors files and an index.
        score_bias: scalar head with a non-zero bias: "error", "fold" or "drop" (score_head.py).
        pad_token_id: set config.json's pad_token_id (transformers' sequence classifiers score
            the last token that is not this id, and refuse batches > 1 without one).
    Returns:
        The config.json dict written.
    """
    ckpt_dir = Path(ckpt_dir)
    with ModelShardsReader(ckpt_dir) as reader, staged_output_dir(out_dir, overwrite) as tmp:
        cfg = reader.cfg
        table = TABLES[cfg.family]
        base_path = _first_with(ckpt_dir, f"{MODEL_SUBDIR}/{HF_CONFIG_FILE}")
        base = json.loads(base_path.read_text()) if base_path.exists() else None
        hf_cfg = model_config_to_hf_config(cfg, base)
        hf_cfg.pop(SCORE_BIAS_KEY, None)
        if pad_token_id is not None:
            hf_cfg["pad_token_id"] = pad_token_id
        mappings = expand(table, cfg, table.prefixes[0])
        entries = _check_stored(reader, mappings, ckpt_dir)
        replaced = {}
        if cfg.head == "scalar":
            where = str(ckpt_dir)
            replaced, kept_bias = export_head_bias(cfg, reader.full_tensor, score_bias, where)
            if kept_bias is not None:
                hf_cfg[SCORE_BIAS_KEY] = kept_bias
        writer = HFWeightsWriter(tmp, entries, max_shard_bytes)
        try:
            for m in mappings:
                full = replaced.get(m.ours)
                full = reader.full_tensor(m.ours) if full is None else full
                for hf_name, t in zip(m.hf, to_hf(m, full), strict=True):
                    writer.write(hf_name, t)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        copy_tokenizer_files(_first_with(ckpt_dir, TOKENIZER_SUBDIR), tmp)
    return hf_cfg


def _check_stored(reader: ModelShardsReader, mappings: list[KeyMapping], ckpt_dir: Path) -> dict:
    """Check the stored names and full shapes against the table; the HF (shape, dtype) entries."""
    wanted = {m.ours for m in mappings}
    if reader.cfg.head == "scalar":
        wanted.add(HEAD_BIAS)  # exported through score_head, not as a tensor
    stored = set(reader.names())
    if stored != wanted:
        raise ConversionError(
            f"{ckpt_dir}: parameters do not match its meta.json config: missing "
            f"{sorted(wanted - stored)[:4]}, unexpected {sorted(stored - wanted)[:4]}"
        )
    entries = {}
    for m in mappings:
        shape, dtype = reader.info(m.ours)
        if shape != m.shape:
            raise ConversionError(
                f"{ckpt_dir}: {m.ours} has full shape {list(shape)}, its meta.json config "
                f"implies {list(m.shape)}"
            )
        entries.update({h: (hf_part_shape(m, k), dtype) for k, h in enumerate(m.hf)})
    return entries


# ----------------------------------------------------------------------------- re-sharding


def reshard(
    ckpt_dir: str | Path, out_dir: str | Path, *, tp: int, pp: int, overwrite: bool = False
) -> ModelConfig:
    """Rewrite a megarlhf checkpoint at another (tp, pp) layout, bit for bit (a LoRA checkpoint:
    its merged model, as a plain checkpoint)."""
    ckpt_dir = Path(ckpt_dir)
    with ModelShardsReader(ckpt_dir) as reader, staged_output_dir(out_dir, overwrite) as tmp:
        infos = {name: reader.info(name) for name in reader.names()}
        writer = ModelShardsWriter(tmp, reader.cfg, tp, pp, infos)
        try:
            for name in reader.names():
                writer.write(name, reader.full_tensor(name))
            writer.close()
        except BaseException:
            writer.abort()
            raise
        base = _first_with(ckpt_dir, f"{MODEL_SUBDIR}/{HF_CONFIG_FILE}")
        if base.exists():
            shutil.copy2(base, tmp / MODEL_SUBDIR / HF_CONFIG_FILE)
        copy_tokenizer_files(_first_with(ckpt_dir, TOKENIZER_SUBDIR), tmp / TOKENIZER_SUBDIR)
    return reader.cfg
