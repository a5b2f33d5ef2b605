"""The megarlhf model-weights format: a safetensors file per (tp, pp) rank, loadable at any layout.

Layout of a checkpoint directory `<dir>`:

    <dir>/model/meta.json                    {"format": 1, "tp": T, "pp": P,
                                              "model": <ModelConfig>, "padded_vocab_size": Vp}
    <dir>/model/tp{t:02d}_pp{p:02d}.safetensors   rank (t, p)'s shards, under GLOBAL names
    <dir>/model/checksums.json               size and checksum of every file above, written last
                                             (`ModelShardsWriter`; `checksums.tpXX_ppYY.json`
                                             per rank file from `save_model_shard` on its own)

Names are the model's full parameter names (`layers.{i}.…` with the global layer index), so a file
says by itself which layers it holds, and tensor shapes are the rank's LOCAL shard shapes. The word
embedding and the output layer are stored padded to `Vp = padded_vocab_size(vocab, div, T)`, which
depends on T: re-sharding to another TP re-pads (padding rows are dropped, then zero rows added).
A tied output layer is stored only where the model holds a copy of it (the last stage when P > 1).

Loading re-shards on the fly: for each parameter the target rank needs, the source shards are read
one tensor at a time (plain reads, see `SafetensorsFile`), joined with `unshard_tensors`, trimmed to
the real vocabulary, re-padded and cut with `shard_tensor` for the target rank. Peak memory is the
rank's own state dict plus one full tensor. Training resume uses `strict_layout=True`, which refuses
a different layout instead of silently re-sharding optimizer-less weights.

Files are read and written tensor by tensor (`safetensors_io`), so loading and converting never hold
more than one full tensor beyond the rank's own weights.

LoRA (model.lora.rank > 0): the directory holds only the trained tensors (the adapters, and a
scalar head) and names its base in meta.json; `ModelShardsReader` and `load_model_shard` read it
as the merged model (checkpoint/lora_shards.py).

Integrity: every file read (meta.json, each rank file opened) is first checked against its
recorded checksum (`checksums.py`): the enclosing atomic checkpoint's COMPLETE.json when the
directory is (or is a subfolder of) a training `step_N`, else the sidecars in `model/`. A corrupt
file raises CorruptCheckpointError naming it; a directory written before checksums existed loads
unchecked (a debug log line).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from megarlhf.checkpoint import checksums
from megarlhf.checkpoint.atomic import MANIFEST as ATOMIC_MANIFEST
from megarlhf.checkpoint.atomic import find_latest
from megarlhf.checkpoint.errors import CheckpointError, CorruptCheckpointError
from megarlhf.checkpoint.lora_shards import (
    META_KEY,
    AdapterMeta,
    LoRABase,
    MergedView,
    select_stored,
    split_meta,
)
from megarlhf.checkpoint.safetensors_io import SafetensorsFile, SafetensorsStreamWriter
from megarlhf.config import ConfigError, ModelConfig, from_dict, to_dict
from megarlhf.model.gpt import (
    full_param_shape,
    layer_range,
    lora_sharding_plan,
    padded_vocab_size,
    sharding_plan,
    stage_param_names,
)
from megarlhf.model.lora import trainable_names
from megarlhf.parallel.sharding import ShardSpec, shard_tensor, unshard_tensors

FORMAT_VERSION = 1
MODEL_SUBDIR = "model"
META_FILE = "meta.json"
# Parameters whose dim 0 is the (padded) vocabulary.
VOCAB_PARAMS = ("embedding.word.weight", "output.weight")
TIED_OUTPUT, TIED_SOURCE = "output.weight", "embedding.word.weight"
RESHARD_HINT = "tools/convert_hf.py --reshard"

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- paths and meta


def rank_file_name(tp_rank: int, pp_rank: int) -> str:
    return f"tp{tp_rank:02d}_pp{pp_rank:02d}.safetensors"


def rank_file(ckpt_dir: str | Path, tp_rank: int, pp_rank: int) -> Path:
    return Path(ckpt_dir) / MODEL_SUBDIR / rank_file_name(tp_rank, pp_rank)


@dataclass(frozen=True)
class ModelShardsMeta:
    """Contents of `model/meta.json`. For a LoRA directory `model` is the merged model's config
    (no adapters: what the directory reads as) and `adapters` says what it holds."""

    tp: int
    pp: int
    model: ModelConfig
    padded_vocab_size: int
    adapters: AdapterMeta | None = None


def write_meta(
    ckpt_dir: str | Path, cfg: ModelConfig, tp: int, pp: int, lora_base: LoRABase | None = None
) -> Path:
    """Write `<dir>/model/meta.json` (atomically: temp file, then rename); a LoRA model's
    (cfg.lora on) needs its `lora_base`."""
    if cfg.lora.enabled and lora_base is None:
        raise CheckpointError("write_meta: a LoRA model's checkpoint needs its base (lora_base)")
    path = Path(ckpt_dir) / MODEL_SUBDIR / META_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT_VERSION,
        "tp": tp,
        "pp": pp,
        "model": to_dict(cfg),
        "padded_vocab_size": padded_vocab_size(
            cfg.vocab_size, cfg.make_vocab_size_divisible_by, tp
        ),
    }
    if cfg.lora.enabled:
        meta[META_KEY] = lora_base.to_json()
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def recorded_entries(ckpt_dir: str | Path) -> dict[str, dict] | None:
    """{path relative to `ckpt_dir` ("model/..."): {"size", "checksum"}} recorded for its model
    files, or None when nothing is (a directory written before checksums existed).

    Sources, first found wins: the COMPLETE.json of the atomic checkpoint `ckpt_dir` is or is a
    subfolder of (`step_N/`, `step_N/critic/`), then the sidecars `model/checksums*.json`.

    Raises:
        CorruptCheckpointError: an unreadable sidecar.
    """
    d = Path(ckpt_dir).absolute()
    for base in (d, d.parent):
        try:
            manifest = json.loads((base / ATOMIC_MANIFEST).read_text())
            sizes, sums = manifest["files"], manifest.get("checksums") or {}
        except (OSError, ValueError, KeyError, TypeError):
            continue
        prefix = d.relative_to(base).as_posix()
        prefix = "" if prefix == "." else f"{prefix}/"
        mine = {
            rel[len(prefix) :]: {"size": size, "checksum": sums.get(rel)}
            for rel, size in sizes.items()
            if rel.startswith(f"{prefix}{MODEL_SUBDIR}/")
        }
        if mine:
            return mine if sums else None
    entries, problems = checksums.read_sidecars(d / MODEL_SUBDIR)
    if problems:
        raise CorruptCheckpointError(problems[0])
    return {f"{MODEL_SUBDIR}/{n}": e for n, e in entries.items()} or None


def recorded_checksums(ckpt_dir: str | Path) -> dict[str, str] | None:
    """{"model/...": checksum} of `recorded_entries`, or None when nothing is recorded."""
    entries = recorded_entries(ckpt_dir)
    if entries is None:
        return None
    return {rel: e.get("checksum") for rel, e in entries.items() if e.get("checksum")}


def verify_model_file(ckpt_dir: str | Path, rel: str, recorded: dict[str, str] | None) -> None:
    """Check `<ckpt_dir>/<rel>` against `recorded` (from `recorded_checksums`) before reading it."""
    if recorded is None:
        logger.debug("%s: no checksums recorded (written before checksums); not verified", ckpt_dir)
        return
    checksums.verify_file(Path(ckpt_dir) / rel, recorded.get(rel))


def read_meta(ckpt_dir: str | Path) -> ModelShardsMeta:
    """Read and validate `<dir>/model/meta.json` (checked against its checksum first)."""
    path = Path(ckpt_dir) / MODEL_SUBDIR / META_FILE
    try:
        if path.is_file():
            verify_model_file(ckpt_dir, f"{MODEL_SUBDIR}/{META_FILE}", recorded_checksums(ckpt_dir))
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{path}: not found; {ckpt_dir} is not a megarlhf checkpoint"
        ) from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    if raw.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format {raw.get('format')!r} is not the supported {FORMAT_VERSION}"
        )
    try:
        cfg, adapters = split_meta(from_dict(ModelConfig, raw["model"], prefix="model."), raw, path)
        meta = ModelShardsMeta(
            int(raw["tp"]), int(raw["pp"]), cfg, int(raw["padded_vocab_size"]), adapters
        )
    except KeyError as e:
        raise CheckpointError(f"{path}: missing field {e}") from None
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    expect = padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, meta.tp)
    if meta.padded_vocab_size != expect:
        raise CheckpointError(
            f"{path}: padded_vocab_size={meta.padded_vocab_size} but vocab_size={cfg.vocab_size}, "
            f"make_vocab_size_divisible_by={cfg.make_vocab_size_divisible_by}, tp={meta.tp} "
            f"give {expect}"
        )
    return meta


# ----------------------------------------------------------------------------- vocab padding


def pad_vocab(full: torch.Tensor, padded: int) -> torch.Tensor:
    """Append zero rows so dim 0 is `padded` long ([V, h] -> [padded, h])."""
    extra = padded - full.shape[0]
    if extra < 0:
        raise ValueError(f"cannot pad {full.shape[0]} vocabulary rows down to {padded}")
    if extra == 0:
        return full
    return torch.cat([full, full.new_zeros((extra, *full.shape[1:]))], dim=0)


def full_for_rank(
    name: str,
    full: torch.Tensor,
    spec: ShardSpec | None,
    padded_vocab: int,
    tp_rank: int,
) -> torch.Tensor:
    """Rank `tp_rank`'s shard of an unpadded full tensor (vocab parameters padded first)."""
    if name in VOCAB_PARAMS:
        full = pad_vocab(full, padded_vocab)
    return shard_tensor(full, spec, tp_rank)


def layout_plan(cfg: ModelConfig, tp: int, pp: int) -> dict[str, ShardSpec | None]:
    """The model's sharding plan at `tp`, after checking that (tp, pp) can hold this model (e.g.
    every TP rank needs a key/value head, every stage a layer)."""
    try:
        if tp < 1 or pp < 1:
            raise ValueError(f"tp={tp} and pp={pp} must be >= 1")
        layer_range(cfg.num_layers, pp, 0)
        return sharding_plan(cfg, tp)
    except ValueError as e:
        raise CheckpointError(f"cannot lay this model out at tp={tp}, pp={pp}: {e}") from None


def stage_targets(cfg: ModelConfig, pp: int, pp_rank: int) -> dict[str, str]:
    """Names stage `pp_rank` holds -> the stored full name it is read from.

    A tied output layer has no tensor of its own in a layout where it is not stored: it is read
    from the word embedding.
    """
    out = {}
    for name in stage_param_names(cfg, pp, pp_rank):
        out[name] = TIED_SOURCE if (name == TIED_OUTPUT and cfg.tie_embeddings) else name
    return out


# ----------------------------------------------------------------------------- per-rank I/O


def _rank_metadata(tp: int, tp_rank: int, pp: int, pp_rank: int) -> dict[str, str]:
    return {
        "format": "pt",
        "megarlhf_format": str(FORMAT_VERSION),
        "tp": str(tp),
        "tp_rank": str(tp_rank),
        "pp": str(pp),
        "pp_rank": str(pp_rank),
    }


def save_model_shard(
    ckpt_dir: str | Path,
    state_dict: Mapping[str, torch.Tensor],
    cfg: ModelConfig,
    *,
    tp: int,
    tp_rank: int,
    pp: int,
    pp_rank: int,
    record_checksums: bool = True,
    lora_base: LoRABase | None = None,
) -> Path:
    """Save one rank's model state dict (global names, local shard shapes) into `<dir>/model/`.

    Checks that the names are exactly those of stage `pp_rank` and every shape is the rank's shard
    shape, so a wrong layout cannot be written. The file is written to a temp name and renamed;
    rank (0, 0) also writes meta.json. Extra non-parameter entries are an error, not skipped.
    With `record_checksums` (off inside an atomic checkpoint, whose manifest records them) the
    rank's sidecar `model/checksums.tpXX_ppYY.json` then records its files' sizes and checksums.
    A LoRA model (cfg.lora on) stores only what it trains (base names in `state_dict` are
    dropped) and records `lora_base` in meta.json.

    Returns:
        The path of the rank file.
    """
    plan = layout_plan(cfg, tp, pp)
    expected = stage_targets(cfg, pp, pp_rank)
    if cfg.lora.enabled:
        state_dict = select_stored(state_dict, cfg, pp, pp_rank, expected)
        expected = {n: n for n in state_dict}
        plan = plan | lora_sharding_plan(cfg, tp)
    names = set(state_dict)
    if names != set(expected):
        raise CheckpointError(
            f"state dict of tp {tp_rank}/{tp}, pp {pp_rank}/{pp} does not match the model: missing "
            f"{sorted(set(expected) - names)[:5]}, unexpected {sorted(names - set(expected))[:5]}"
        )
    tensors = {}
    for name in expected:
        t = state_dict[name]
        spec = plan[name]
        if spec is not None and (
            t.dim() <= spec.dim or t.shape[spec.dim] != spec.local_size(tp_rank)
        ):
            raise CheckpointError(
                f"{name}: shape {tuple(t.shape)} is not tp rank {tp_rank}/{tp}'s shard (expected "
                f"{spec.local_size(tp_rank)} along dim {spec.dim})"
            )
        tensors[name] = t.detach().to("cpu").contiguous()
    path = rank_file(ckpt_dir, tp_rank, pp_rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=_rank_metadata(tp, tp_rank, pp, pp_rank))
    os.replace(tmp, path)
    names = [path.name]
    if tp_rank == 0 and pp_rank == 0:
        write_meta(ckpt_dir, cfg, tp, pp, lora_base)
        names.append(META_FILE)
    if record_checksums:
        sidecar = path.parent / f"checksums.{path.name.removesuffix('.safetensors')}.json"
        checksums.write_sidecar(sidecar, checksums.sidecar_entries(path.parent, names))
    return path


class ModelShardsReader:
    """Lazy reader of a checkpoint at any layout: full (unsharded, unpadded) tensors on demand.

    Only the shards of the requested tensor are read (`SafetensorsFile`, no memory map), so a
    reader costs one full tensor at a time. A LoRA directory reads as its merged model (`cfg`
    without adapters, W + (alpha / r) B A; its base is read one tensor at a time as well).
    """

    def __init__(self, ckpt_dir: str | Path):
        self.ckpt_dir = Path(ckpt_dir)
        self.meta = read_meta(ckpt_dir)
        self._checksums = recorded_checksums(ckpt_dir)
        self.cfg = self.meta.model
        adapters = self.meta.adapters
        stored_cfg = adapters.model_config(self.cfg) if adapters else self.cfg
        self._plan = sharding_plan(stored_cfg, self.meta.tp)
        self._plan |= lora_sharding_plan(stored_cfg, self.meta.tp)
        self._merged = None
        if adapters is not None:
            self._merged = MergedView(
                stored_cfg, adapters, self.meta.padded_vocab_size, self.stored_tensor,
                ModelShardsReader, self.ckpt_dir,
            )  # fmt: skip
        self._stack = ExitStack()
        self._files: dict[tuple[int, int], object] = {}
        # Stored full name -> pipeline stage holding it (a tied output copy is not a source).
        self._stage_of: dict[str, int] = {}
        for p in range(self.meta.pp):
            for name in stage_param_names(self.cfg, self.meta.pp, p):
                if name == TIED_OUTPUT and self.cfg.tie_embeddings:
                    continue
                self._stage_of.setdefault(name, p)
        # Where each tensor the files hold lives (a LoRA directory: its trained tensors only).
        self._file_stage = dict(self._stage_of)
        if adapters is not None:
            self._file_stage = {
                n: p
                for p in range(self.meta.pp)
                for n in trainable_names(stored_cfg, self.meta.pp, p)
            }

    def __enter__(self) -> ModelShardsReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._merged is not None:
            self._merged.close()
        self._stack.close()
        self._files.clear()

    def names(self) -> list[str]:
        """Full parameter names stored, in model order (a tied output layer is not listed)."""
        return list(self._stage_of)

    def _open(self, tp_rank: int, pp_rank: int):
        key = (tp_rank, pp_rank)
        if key not in self._files:
            path = rank_file(self.ckpt_dir, tp_rank, pp_rank)
            if not path.exists():
                raise CheckpointError(
                    f"{path}: missing (meta.json says tp={self.meta.tp}, pp={self.meta.pp})"
                )
            # The header first (a truncated file is reported as such), then the content.
            f = self._stack.enter_context(SafetensorsFile(path))
            verify_model_file(self.ckpt_dir, f"{MODEL_SUBDIR}/{path.name}", self._checksums)
            md = f.metadata()
            want = _rank_metadata(self.meta.tp, tp_rank, self.meta.pp, pp_rank)
            if any(md.get(k) != v for k, v in want.items() if k != "format"):
                raise CheckpointError(f"{path}: header says {md}, expected {want}")
            self._files[key] = f
        return self._files[key]

    def _shards(self, name: str) -> Iterator[tuple[Path, object]]:
        if name not in self._file_stage:
            raise CheckpointError(f"{self.ckpt_dir}: no parameter {name!r} in this checkpoint")
        p = self._file_stage[name]
        for t in range(self.meta.tp):
            yield rank_file(self.ckpt_dir, t, p), self._open(t, p)

    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """(full unpadded shape, dtype) of a stored parameter, from the headers only."""
        if self._merged is not None:
            self._check_name(name)
            return full_param_shape(self.cfg, name), self.cfg.torch_dtype
        return self._stored_info(name)

    def _stored_info(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """(full unpadded shape, dtype) of a tensor the files hold (in a LoRA directory also an
        adapter factor, which `info` does not list), from the headers only."""
        shapes = []
        dtype = None
        for _, f in self._shards(name):
            shape, dtype = f.info(name)
            shapes.append(shape)
        spec = self._plan[name]
        shape = list(shapes[0])
        if spec is not None:
            shape[spec.dim] = sum(s[spec.dim] for s in shapes)
        if name in VOCAB_PARAMS:
            shape[0] = self.cfg.vocab_size
        return tuple(shape), dtype

    def local_tensor(self, name: str, tp_rank: int, pp_rank: int) -> torch.Tensor:
        """The shard stored in rank file (tp_rank, pp_rank), as saved."""
        return self._open(tp_rank, pp_rank).get_tensor(name)

    def full_tensor(self, name: str) -> torch.Tensor:
        """The full parameter, joined from every TP shard, with vocabulary padding removed (a
        LoRA directory: the merged parameter)."""
        if self._merged is not None:
            self._check_name(name)
            return self._merged.full_tensor(name)
        return self.stored_tensor(name)

    def _check_name(self, name: str) -> None:
        if name not in self._stage_of:
            raise CheckpointError(f"{self.ckpt_dir}: no parameter {name!r} in this checkpoint")

    def stored_tensor(self, name: str) -> torch.Tensor:
        """A tensor the files hold, joined from every TP shard, vocabulary padding removed (in a
        LoRA directory: an adapter factor `....lora.a` / `.lora.b`, or a trained head)."""
        spec, files = self._plan[name], [f for _, f in self._shards(name)]
        if len(files) == 1:
            full = files[0].get_tensor(name)  # tp=1: the shard is the full tensor
        elif spec is not None and spec.dim == 0 and len(spec.parts) == 1:
            # Row-split (the embeddings, a LoRA B of a column-parallel W): read each shard
            # straight into its rows, no extra copy.
            shape, dtype = self._stored_info(name)
            full = torch.empty((spec.full_size, *shape[1:]), dtype=dtype)
            for t, f in enumerate(files):
                f.get_tensor(name, out=full.narrow(0, sum(spec.parts[0][:t]), spec.parts[0][t]))
        else:
            try:
                full = unshard_tensors([f.get_tensor(name) for f in files], spec)
            except ValueError as e:
                raise CheckpointError(f"{self.ckpt_dir}: {name}: {e}") from None
        if name in VOCAB_PARAMS:
            if full.shape[0] != self.meta.padded_vocab_size:
                raise CheckpointError(
                    f"{self.ckpt_dir}: {name} has {full.shape[0]} rows, meta.json says "
                    f"padded_vocab_size={self.meta.padded_vocab_size}"
                )
            full = full[: self.cfg.vocab_size].contiguous()
        return full


def load_model_shard(
    ckpt_dir: str | Path,
    *,
    tp: int,
    tp_rank: int,
    pp: int,
    pp_rank: int,
    strict_layout: bool = False,
) -> dict[str, torch.Tensor]:
    """State dict of rank (tp_rank, pp_rank) in a (tp, pp) layout, from a checkpoint at any layout.

    Args:
        ckpt_dir: checkpoint directory (holding `model/`).
        tp, tp_rank, pp, pp_rank: the layout and coordinates of the loading rank.
        strict_layout: refuse a checkpoint saved at another (tp, pp) (training resume, where the
            optimizer state is sharded too) instead of re-sharding.

    Returns:
        {global name: local shard}, in the checkpoint's dtype; vocabulary padded for `tp`.
    """
    meta = read_meta(ckpt_dir)
    if (meta.tp, meta.pp) != (tp, pp):
        if strict_layout:
            raise CheckpointError(
                f"{ckpt_dir} was saved at tp={meta.tp}, pp={meta.pp} but this run uses tp={tp}, "
                f"pp={pp}; resuming needs the same layout. Re-shard the weights with "
                f"`python {RESHARD_HINT} {ckpt_dir} OUT --tp {tp} --pp {pp}` and start from OUT "
                f"(the optimizer state is not re-sharded)"
            )
    cfg = meta.model
    plan = layout_plan(cfg, tp, pp)
    vp = padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, tp)
    out = {}
    with ModelShardsReader(ckpt_dir) as reader:
        same = (meta.tp, meta.pp) == (tp, pp) and meta.adapters is None
        for name, source in stage_targets(cfg, pp, pp_rank).items():
            if same:
                # Same layout: the rank's own file holds the shard (a tied output copy included).
                out[name] = reader.local_tensor(name, tp_rank, pp_rank)
                continue
            out[name] = full_for_rank(name, reader.full_tensor(source), plan[name], vp, tp_rank)
    return out


class ModelShardsWriter:
    """Write a whole checkpoint at layout (tp, pp) from full tensors, one tensor at a time.

    Every rank file is opened up front with its header (computed from `infos`); `write(name, full)`
    pads the vocabulary, cuts each rank's shard and writes it into every rank file that holds the
    parameter (a tied output copy included), so memory holds one full tensor plus one shard.

    Args:
        ckpt_dir: checkpoint folder (`model/` is created in it).
        cfg: the model.
        tp, pp: target layout.
        infos: stored full name -> (full unpadded shape, dtype), for every parameter to write.
    """

    def __init__(self, ckpt_dir, cfg: ModelConfig, tp: int, pp: int, infos: Mapping):
        self.ckpt_dir, self.cfg, self.tp, self.pp = Path(ckpt_dir), cfg, tp, pp
        self._plan = layout_plan(cfg, tp, pp)
        self._vp = padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, tp)
        (self.ckpt_dir / MODEL_SUBDIR).mkdir(parents=True, exist_ok=True)
        for stale in (self.ckpt_dir / MODEL_SUBDIR).glob(checksums.SIDECAR_GLOB):
            stale.unlink()  # would describe files this writer replaces
        self._writers: list[SafetensorsStreamWriter] = []
        # Stored full name -> [(rank file writer, name in that file, tp rank)].
        self._targets: dict[str, list] = {}
        try:
            self._open_all(infos)
        except BaseException:
            self.abort()
            raise
        missing = sorted(set(self._targets) - set(infos))
        unused = sorted(set(infos) - set(self._targets))
        if missing or unused:
            self.abort()
            raise CheckpointError(
                f"parameters do not match the model: missing {missing[:4]}, unexpected {unused[:4]}"
            )

    def _open_all(self, infos: Mapping) -> None:
        for p in range(self.pp):
            stage = stage_targets(self.cfg, self.pp, p)
            for t in range(self.tp):
                entries = {}
                for name, source in stage.items():
                    if source not in infos:
                        continue  # reported by the caller's name check
                    shape, dtype = infos[source]
                    shape = list(shape)
                    if name in VOCAB_PARAMS:
                        shape[0] = self._vp
                    entries[name] = (_local_shape(shape, self._plan[name], t), dtype)
                w = SafetensorsStreamWriter(
                    rank_file(self.ckpt_dir, t, p), entries, _rank_metadata(self.tp, t, self.pp, p)
                )
                self._writers.append(w)
                for name, source in stage.items():
                    self._targets.setdefault(source, []).append((w, name, t))

    def write(self, name: str, full: torch.Tensor) -> None:
        """Write full (unsharded, unpadded) parameter `name` into every rank file holding it."""
        if name in VOCAB_PARAMS:
            full = pad_vocab(full, self._vp)
        for writer, target, t in self._targets[name]:
            writer.write(target, _shard_view(full, self._plan[target], t))

    def close(self) -> None:
        """Finish every file (checking nothing is missing), write meta.json, and last
        `model/checksums.json` with every file's size and checksum."""
        for w in self._writers:
            w.close()
        write_meta(self.ckpt_dir, self.cfg, self.tp, self.pp)
        folder = self.ckpt_dir / MODEL_SUBDIR
        names = [w.path.name for w in self._writers] + [META_FILE]
        checksums.write_sidecar(
            folder / checksums.SIDECAR, checksums.sidecar_entries(folder, names)
        )

    def abort(self) -> None:
        for w in self._writers:
            w.abort()


def _shard_view(full: torch.Tensor, spec: ShardSpec | None, tp_rank: int) -> torch.Tensor:
    """Like `shard_tensor`, but a view where no concatenation is needed (saves a copy of the
    largest tensors, the embeddings, when streaming)."""
    if spec is None:
        return full
    if len(spec.parts) == 1:
        part = spec.parts[0]
        return full.narrow(spec.dim, sum(part[:tp_rank]), part[tp_rank])
    return shard_tensor(full, spec, tp_rank)


def _local_shape(full_shape, spec: ShardSpec | None, tp_rank: int) -> tuple[int, ...]:
    shape = list(full_shape)
    if spec is not None:
        shape[spec.dim] = spec.local_size(tp_rank)
    return tuple(shape)


def check_model_shards(ckpt_dir: str | Path) -> checksums.Report:
    """Every problem of a model-shard directory, reading no tensor: meta.json unreadable, a rank
    file its layout implies missing, a recorded file missing or of another size or content."""
    d = Path(ckpt_dir)
    report = checksums.Report()
    try:
        entries = recorded_entries(d)
    except CorruptCheckpointError as e:
        report.problems.append(str(e))
        entries = None
    if entries is None:
        report.notes.append(f"{d}: no checksums recorded (written before checksums): sizes unknown")
    listed = dict(entries or {})
    meta_path = d / MODEL_SUBDIR / META_FILE
    try:
        raw = json.loads(meta_path.read_text())
        tp, pp = int(raw["tp"]), int(raw["pp"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        report.problems.append(f"{meta_path}: unreadable ({e})")
        tp = pp = 0
    for rel in [f"{MODEL_SUBDIR}/{META_FILE}"] + [
        f"{MODEL_SUBDIR}/{rank_file_name(t, p)}" for p in range(pp) for t in range(tp)
    ]:
        if entries is not None and rel not in listed:
            report.notes.append(f"{d / rel}: no checksum recorded")
        listed.setdefault(rel, {})
    report.add(d, listed)
    return report


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """The directory holding `model/meta.json` that `path` designates.

    `path` may be such a directory itself (a converted checkpoint or a training `step_N`), a
    checkpoints root (its latest complete step, via the `latest` pointer), or a training run's
    output directory (the latest complete step under `checkpoints/`).
    """
    path = Path(path)
    if (path / MODEL_SUBDIR / META_FILE).is_file():
        return path
    for root in (path / "checkpoints", path):
        if root.is_dir():
            step = find_latest(root)
            if step is not None and (step / MODEL_SUBDIR / META_FILE).is_file():
                return step
    raise CheckpointError(
        f"{path} is not a megarlhf checkpoint: no {MODEL_SUBDIR}/{META_FILE} in it, and no "
        "complete step_N under it or under its checkpoints/"
    )
