"""LoRA checkpoints: a model-shard directory holding only what a LoRA model trains, and its base
by reference.

    <dir>/model/meta.json               the usual fields (`model` with its `lora` section) and
                                        "lora_base": {"path": <checkpoint> | null, "seed": S}
    <dir>/model/tpXX_ppYY.safetensors   rank (t, p)'s adapter factors `layers.{i}.<linear>.lora.a`
                                        / `.lora.b` (and a scalar head), global names, local
                                        shard shapes (`gpt.lora_sharding_plan`)

The base is the checkpoint the frozen weights were loaded from (`checkpoint.init_from`,
`ppo.critic_init`, ...; an absolute path, which must stay where it is), or null: the seeded random
initialization, which `init_full_parameter` rebuilds exactly at any layout from `seed`. Nothing
of the base is copied, so a checkpoint of SmolLM2-135M at rank 8 on every linear is 9.8 MB
(fp32 factors, 2.4 M parameters) instead of 540 MB.

Reading: `ModelShardsReader` presents a LoRA directory as its merged model (`MergedView`): its
config is the model without adapters, its tensors W + (alpha / r) B A (fp32 arithmetic, the
model's dtype), so every consumer of model shards (conversion to HF, re-sharding, `init_from`,
generation, evaluation) reads a LoRA checkpoint as the model it stands for. A LoRA run resuming
reloads its frozen base from the recorded source instead (`init_from.restore_base`), and its
adapters from DeepSpeed's state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from megarlhf.checkpoint.errors import CheckpointError
from megarlhf.config import ModelConfig
from megarlhf.config.model import LoRAConfig
from megarlhf.model.gpt import full_param_shape, init_full_parameter, lora_trainable
from megarlhf.model.lora import adapter_names, base_config, merge_full, trainable_names

META_KEY = "lora_base"
VOCAB_PARAMS = ("embedding.word.weight", "output.weight")


@dataclass(frozen=True)
class LoRABase:
    """Where a LoRA model's frozen weights come from.

    Attributes:
        path: the checkpoint they were loaded from (absolute), or None: the seeded
            initialization.
        seed: the model's initialization seed (rebuilds a None base; fresh heads and adapters
            were drawn from it too).
    """

    path: str | None
    seed: int

    def to_json(self) -> dict:
        return {"path": self.path, "seed": self.seed}

    @staticmethod
    def from_json(raw, where) -> LoRABase:
        if not isinstance(raw, dict) or "seed" not in raw:
            raise CheckpointError(f"{where}: {META_KEY} must be {{'path': ..., 'seed': ...}}")
        path = raw.get("path")
        return LoRABase(None if path is None else str(path), int(raw["seed"]))

    @staticmethod
    def of(model) -> LoRABase:
        """The base of a GPTModel (its `base_checkpoint` and `seed`)."""
        return LoRABase(getattr(model, "base_checkpoint", None), int(getattr(model, "seed", 0)))


@dataclass(frozen=True)
class AdapterMeta:
    """What `read_meta` adds for a LoRA directory: its adapters and its base."""

    lora: LoRAConfig
    base: LoRABase

    def model_config(self, merged: ModelConfig) -> ModelConfig:
        """The adapted model's config (the merged one with the adapters back)."""
        return dataclasses.replace(merged, lora=self.lora)


def split_meta(cfg: ModelConfig, raw: dict, where) -> tuple[ModelConfig, AdapterMeta | None]:
    """(merged model config, adapters) of a meta.json whose model config is `cfg`."""
    if not cfg.lora.enabled:
        return cfg, None
    if META_KEY not in raw:
        raise CheckpointError(f"{where}: a LoRA checkpoint (model.lora.rank > 0) needs {META_KEY}")
    return base_config(cfg), AdapterMeta(cfg.lora, LoRABase.from_json(raw[META_KEY], where))


def select_stored(state_dict, cfg: ModelConfig, pp: int, pp_rank: int, base_names) -> dict:
    """The tensors of `state_dict` a LoRA rank file stores. The frozen base's names may be in
    `state_dict` (a whole model's state) and are dropped; any other name is an error."""
    want = trainable_names(cfg, pp, pp_rank)
    names = set(state_dict)
    missing = sorted(set(want) - names)
    unexpected = sorted(names - set(want) - set(base_names))
    if missing or unexpected:
        raise CheckpointError(
            f"LoRA state dict of pp {pp_rank}/{pp} does not match the model: missing "
            f"{missing[:5]}, unexpected {unexpected[:5]}"
        )
    return {n: state_dict[n] for n in want}


class MergedView:
    """Full tensors of the merged model of a LoRA directory.

    Args:
        cfg: the adapted model's config (lora section on).
        adapters: the directory's AdapterMeta.
        padded_vocab: the directory's padded vocabulary (its training layout's).
        own_full: full (unsharded, unpadded) tensor of a name the directory stores itself.
        open_base: opens a reader of the base checkpoint (a ModelShardsReader).
        where: the directory, for messages.
    """

    def __init__(self, cfg, adapters: AdapterMeta, padded_vocab: int, own_full, open_base, where):
        self.cfg, self.base = cfg, adapters.base
        self.padded_vocab, self.own_full = padded_vocab, own_full
        self._open_base: Callable = open_base
        self._base_reader = None
        self.where = where

    def full_tensor(self, name: str) -> torch.Tensor:
        """The merged model's full parameter `name` (unpadded vocabulary), in the model dtype."""
        dtype = self.cfg.torch_dtype
        if lora_trainable(self.cfg, name):
            return self.own_full(name).to(dtype)
        weight = self._base_full(name).to(dtype)
        pair = adapter_names(self.cfg, name)
        if pair is None:
            return weight
        a, b = (self.own_full(n) for n in pair)
        return merge_full(weight, a, b, self.cfg.lora.scale)

    def _base_full(self, name: str) -> torch.Tensor:
        if self.base.path is None:
            shape = list(full_param_shape(self.cfg, name))
            if name in VOCAB_PARAMS:
                shape[0] = self.padded_vocab  # drawn at the training layout's padded size
            full = init_full_parameter(name, shape, self.cfg, self.base.seed)
            return full[: self.cfg.vocab_size] if name in VOCAB_PARAMS else full
        if self._base_reader is None:
            path = Path(self.base.path)
            if not path.is_dir():
                raise CheckpointError(
                    f"{self.where}: its LoRA base {path} is gone; a LoRA checkpoint holds only "
                    "the adapters, and reads the frozen weights from there"
                )
            self._base_reader = self._open_base(path)
        return self._base_reader.full_tensor(name)

    def close(self) -> None:
        if self._base_reader is not None:
            self._base_reader.close()
            self._base_reader = None
