"""`checkpoint.init_from`: start a run from the weights of a megarlhf checkpoint at any layout.

Same head: every tensor is loaded (re-sharded to this rank's TP x PP position).

Language-model checkpoint into a scalar-head model (SFT or converted HF model -> reward model or
critic): the trunk (embeddings, layers, final norm) is loaded, `output.weight` (an untied LM head,
or the last stage's copy of a tied embedding) is dropped, and the scalar head keeps the fresh
initialization the model was built with (`head.weight` ~ N(0, 1/(h+1)) from the run's seed,
`head.bias` = 0). A reward-model checkpoint cannot start a language model (it has no LM head).

LoRA. A model with adapters (model.lora.rank > 0) loads its frozen base this way and keeps its
adapters fresh (B = 0: it starts as the base). A LoRA checkpoint read as `init_from` is its merged
model (W + (alpha / r) B A), so a LoRA SFT run's output starts a PPO run whose new adapters sit on
the SFT-merged weights. The model remembers where its base came from (`base_checkpoint`), which
its LoRA checkpoints record and `restore_base` reloads on resume.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from megarlhf.checkpoint.lora_shards import LoRABase
from megarlhf.checkpoint.model_shards import load_model_shard, read_meta
from megarlhf.config import ConfigError, ModelConfig, to_dict
from megarlhf.model.gpt import init_full_parameter, is_adapter
from megarlhf.parallel.sharding import shard_tensor
from megarlhf.parallel.state import ParallelState

logger = logging.getLogger(__name__)

# ModelConfig fields that may differ between an init_from checkpoint and this run.
NON_SHAPE_FIELDS = frozenset(
    {
        "dtype",
        "activation_recompute",
        "hidden_dropout",
        "attention_dropout",
        "use_flash_attn",
        "attention",
        "init_std",
        # Adapters are not in the weights: a LoRA model loads a plain checkpoint as its base.
        "lora",
    }
)
# Fields that only describe the output layer, ignored when an LM trunk starts a scalar head.
HEAD_FIELDS = frozenset({"head", "num_head_outputs", "tie_embeddings"})
LM_ONLY = ("output.weight",)


def _check_same_model(path: Path, theirs: ModelConfig, ours: ModelConfig, ignore) -> None:
    a, b = to_dict(theirs), to_dict(ours)
    diff = sorted(k for k in b if k not in ignore and b[k] != a.get(k))
    if diff:
        raise ConfigError(
            f"checkpoint.init_from: {path} holds a different model: "
            + ", ".join(f"model.{k}={a.get(k)!r} (config has {b[k]!r})" for k in diff)
        )


def load_init_weights(
    model: torch.nn.Module, path: str | Path, ps: ParallelState, frozen_only: bool = False
) -> dict:
    """Copy a checkpoint's weights into this rank's stage `model` (before DeepSpeed wraps it).

    Args:
        model: this rank's GPTModel stage, already initialized (its fresh head is kept when the
            checkpoint has an LM head and the model a scalar one; LoRA adapters stay fresh).
        path: a megarlhf checkpoint directory (holding `model/meta.json`), any TP/PP layout.
        ps: this rank's layout.
        frozen_only: copy into frozen parameters only (LoRA resume: what trains comes from
            DeepSpeed's state).
    Returns:
        {"loaded": names copied, "dropped": checkpoint tensors not used, "fresh": parameters
        left at their initialization}.
    Raises:
        ConfigError: another model shape, an LM from a scalar-head checkpoint, or tensors that do
            not match the model's parameters.
    """
    path = Path(path)
    theirs, ours = read_meta(path).model, model.cfg
    trunk_only = theirs.head == "lm" and ours.head == "scalar"
    if theirs.head == "scalar" and ours.head == "lm":
        raise ConfigError(
            f"checkpoint.init_from: {path} is a scalar-head (reward / value) model; a language "
            "model cannot start from it (it has no output layer)"
        )
    _check_same_model(path, theirs, ours, NON_SHAPE_FIELDS | (HEAD_FIELDS if trunk_only else set()))
    weights = load_model_shard(
        path, tp=ps.tp_size, tp_rank=ps.tp_rank, pp=ps.pp_size, pp_rank=ps.pp_rank
    )
    dropped = [n for n in LM_ONLY if n in weights] if trunk_only else []
    for name in dropped:
        del weights[name]
    params = dict(model.named_parameters())
    fresh = sorted(n for n in params if n not in weights and not is_adapter(n))
    if not trunk_only and fresh:
        raise ConfigError(f"checkpoint.init_from: {path} lacks {fresh[:5]}")
    if trunk_only and any(not n.startswith("head.") for n in fresh):
        raise ConfigError(f"checkpoint.init_from: {path} lacks trunk tensors {fresh[:5]}")
    unexpected = sorted(set(weights) - set(params))
    if unexpected:
        raise ConfigError(f"checkpoint.init_from: unexpected tensors {unexpected[:5]}")
    with torch.no_grad():
        for name, w in weights.items():
            if not (frozen_only and params[name].requires_grad):
                params[name].copy_(w)
    model.base_checkpoint = str(path.resolve())
    if trunk_only:
        logger.info(
            "initialized the trunk from %s (language-model head dropped: %s; fresh scalar head: "
            "%s)",
            path,
            dropped or "none on this stage",
            fresh or "none on this stage",
        )
    else:
        logger.info("initialized weights from %s", path)
    return {"loaded": sorted(weights), "dropped": dropped, "fresh": fresh}


@torch.no_grad()
def restore_base(model: torch.nn.Module, base: LoRABase, ps: ParallelState) -> None:
    """Put a LoRA model's frozen weights back as its checkpoint recorded them (resume): loaded
    from `base.path` again, or (None) rebuilt from the seeded initialization. The trained
    tensors are left alone (DeepSpeed's state restores them).

    Raises:
        ConfigError: the base checkpoint is gone or holds another model.
    """
    if base.path is not None:
        if not Path(base.path).is_dir():
            raise ConfigError(
                f"LoRA resume: the base {base.path} recorded in the checkpoint is gone (a LoRA "
                "checkpoint holds only the adapters; the frozen weights are read from there)"
            )
        load_init_weights(model, base.path, ps, frozen_only=True)
        return
    for name, p in model.named_parameters():
        if p.requires_grad:
            continue
        spec = model.plan[name]
        shape = list(p.shape)
        if spec is not None:
            shape[spec.dim] = spec.full_size
        full = init_full_parameter(name, shape, model.cfg, base.seed)
        p.copy_(shard_tensor(full, spec, ps.tp_rank))
    model.base_checkpoint, model.seed = None, base.seed
