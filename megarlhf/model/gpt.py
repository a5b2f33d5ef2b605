"""GPT model, tensor- and pipeline-parallel, in two families from one config.

- gpt2: learned positions, LayerNorm, tanh-GELU MLP, biases, tied embeddings.
- llama: RoPE (HF rotate_half convention), RMSNorm, SwiGLU, grouped-query attention, tied or not.

A pipeline stage builds only its own layers (`pre_process`: embeddings; `post_process`: final norm
and output layer). Parameter names are global (`layers.{i}` with the global layer index), so a
stage's state dict can be merged with the others' by name. The output layer is vocab-parallel and
returns this rank's shard of the logits `[b, s, padded_vocab / tp]`; columns beyond the real
vocabulary are filled with `finfo(dtype).min` so they carry exactly zero probability. With
`head: scalar` the last stage ends in a tensor-parallel scalar head instead (reward model, critic)
and returns per-token scores `[b, s, num_head_outputs]`.

With `model.lora.rank > 0` the targeted linears of every block carry low-rank adapters
(`layers.{i}.attention.qkv.lora.a` / `.lora.b`, ...), laid out by `lora_sharding_plan`, and only
they (and a scalar head) train: every other parameter is built frozen (requires_grad=False).
`megarlhf.model.lora` has the rest (turning adapters off, merging, what a checkpoint holds).

Simplifications: no sequence parallelism, no interleaved pipeline chunks, no MoE.
"""

from __future__ import annotations

import zlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megarlhf.config import ModelConfig
from megarlhf.model.masks import build_attention_mask, positions_from_mask
from megarlhf.model.rotary import rotary_cos_sin
from megarlhf.model.transformer import TransformerLayer, make_norm
from megarlhf.parallel.layers import VocabParallelEmbedding
from megarlhf.parallel.mappings import (
    copy_to_tensor_parallel_region,
    reduce_from_tensor_parallel_region,
    scatter_to_tensor_parallel_region,
)
from megarlhf.parallel.random import RNGStatesTracker, tensor_parallel_seed
from megarlhf.parallel.sharding import ShardSpec, balanced_sizes, shard_tensor
from megarlhf.parallel.state import ParallelState

# --------------------------------------------------------------------------- layout (pure functions


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Vocabulary padded to a multiple of `divisible_by * tp` (Megatron's rule).

    The padding depends on TP, so re-sharding to another TP re-pads; padding rows are zero and
    their logits are masked, so they never change a result.
    """
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def layer_range(num_layers: int, pp: int, pp_rank: int) -> tuple[int, int]:
    """Global layer indices [start, end) of pipeline stage `pp_rank` (balanced, contiguous)."""
    if pp > num_layers:
        raise ValueError(f"parallel.pp={pp} exceeds model.num_layers={num_layers}")
    sizes = balanced_sizes(num_layers, pp)
    start = sum(sizes[:pp_rank])
    return start, start + sizes[pp_rank]


def head_split(cfg: ModelConfig, tp: int) -> list[int]:
    """Key/value heads per TP rank; each rank also takes the query heads of its kv groups."""
    if tp > cfg.num_kv_heads:
        raise ValueError(
            f"parallel.tp={tp} exceeds model.num_kv_heads={cfg.num_kv_heads}: every TP rank "
            "needs at least one key/value head"
        )
    return balanced_sizes(cfg.num_kv_heads, tp)


def has_output_weight(cfg: ModelConfig, pre_process: bool, post_process: bool) -> bool:
    """An `output.weight` exists for an LM head when untied, or tied but on a last stage without
    embeddings."""
    return post_process and cfg.head == "lm" and (not cfg.tie_embeddings or not pre_process)


def sharding_plan(cfg: ModelConfig, tp: int) -> dict[str, ShardSpec | None]:
    """ShardSpec of every full-model parameter name (None: replicated across TP)."""
    hd, rep = cfg.head_dim, cfg.num_heads // cfg.num_kv_heads
    kv = head_split(cfg, tp)
    q_sizes = tuple(n * rep * hd for n in kv)
    k_sizes = tuple(n * hd for n in kv)
    ffn = tuple(balanced_sizes(cfg.ffn_hidden_size, tp))
    vp = padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, tp)
    gpt2 = cfg.family == "gpt2"
    vocab = ShardSpec.even(0, vp, tp)
    plan: dict[str, ShardSpec | None] = {"embedding.word.weight": vocab}
    if gpt2:
        plan["embedding.position.weight"] = None
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        qkv = ShardSpec(0, (q_sizes, k_sizes, k_sizes))
        fc1 = ShardSpec(0, (ffn,) if gpt2 else (ffn, ffn))
        layer = {
            "input_norm.weight": None,
            "attention.qkv.weight": qkv,
            "attention.proj.weight": ShardSpec(1, (q_sizes,)),
            "post_attention_norm.weight": None,
            "mlp.fc1.weight": fc1,
            "mlp.fc2.weight": ShardSpec(1, (ffn,)),
        }
        if gpt2:
            layer.update(
                {
                    "input_norm.bias": None,
                    "attention.qkv.bias": qkv,
                    "attention.proj.bias": None,
                    "post_attention_norm.bias": None,
                    "mlp.fc1.bias": fc1,
                    "mlp.fc2.bias": None,
                }
            )
        plan.update({p + k: v for k, v in layer.items()})
    plan["final_norm.weight"] = None
    if gpt2:
        plan["final_norm.bias"] = None
    if cfg.head == "lm":
        plan["output.weight"] = vocab
    else:
        # Scalar head split along the hidden dim: each rank dots its slice, then a TP sum.
        plan["head.weight"] = ShardSpec(1, (tuple(balanced_sizes(cfg.hidden_size, tp)),))
        plan["head.bias"] = None
    return plan


# LoRA targets (model.lora.target_modules) -> the linear's name inside a block; proj and fc2 are
# row-parallel (input split), qkv and fc1 column-parallel (output split).
LORA_LINEARS = {
    "qkv": "attention.qkv",
    "proj": "attention.proj",
    "fc1": "mlp.fc1",
    "fc2": "mlp.fc2",
}
ROW_PARALLEL_TARGETS = ("proj", "fc2")


def lora_sharding_plan(cfg: ModelConfig, tp: int) -> dict[str, ShardSpec | None]:
    """ShardSpec of every adapter factor, in model order (empty without model.lora).

    Factors are sharded like the base weight W they adapt: a column-parallel W [out/tp, in] has
    A [r, in] replicated and B [out/tp, r] split as W's rows (fused q|k|v or gate|up parts
    included); a row-parallel W [out, in/tp] has A [r, in/tp] split as W's columns and B [out, r]
    replicated.
    """
    if not cfg.lora.enabled:
        return {}
    base = sharding_plan(cfg, tp)
    targets = [t for t in LORA_LINEARS if t in cfg.lora.target_modules]
    plan: dict[str, ShardSpec | None] = {}
    for i in range(cfg.num_layers):
        for t in targets:
            w = f"layers.{i}.{LORA_LINEARS[t]}"
            row = t in ROW_PARALLEL_TARGETS
            plan[f"{w}.lora.a"] = base[f"{w}.weight"] if row else None
            plan[f"{w}.lora.b"] = None if row else base[f"{w}.weight"]
    return plan


def is_adapter(name: str) -> bool:
    """A LoRA factor (`....lora.a` or `....lora.b`)."""
    return ".lora." in name


def adapted_weight(name: str) -> str:
    """The base weight an adapter factor belongs to (`layers.0.mlp.fc1.lora.a` ->
    `layers.0.mlp.fc1.weight`)."""
    return name.rsplit(".lora.", 1)[0] + ".weight"


def lora_trainable(cfg: ModelConfig, name: str) -> bool:
    """Whether parameter `name` trains under LoRA: the adapters, and a scalar head (it starts
    fresh, so a frozen one would score at random; PEFT's `modules_to_save` for classifiers)."""
    return is_adapter(name) or (cfg.head == "scalar" and name.startswith("head."))


def full_param_shape(cfg: ModelConfig, name: str) -> tuple[int, ...]:
    """Shape of the full (unsharded) parameter `name`, vocabulary rows unpadded."""
    if is_adapter(name):
        out, inp = full_param_shape(cfg, adapted_weight(name))
        return (cfg.lora.rank, inp) if name.endswith(".a") else (out, cfg.lora.rank)
    h, hd, f = cfg.hidden_size, cfg.head_dim, cfg.ffn_hidden_size
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * hd
    fc1 = 2 * f if cfg.family == "llama" else f
    shapes = {
        "embedding.word.weight": (cfg.vocab_size, h),
        "embedding.position.weight": (cfg.max_seq_len, h),
        "attention.qkv.weight": (qkv, h),
        "attention.qkv.bias": (qkv,),
        "attention.proj.weight": (h, cfg.num_heads * hd),
        "mlp.fc1.weight": (fc1, h),
        "mlp.fc1.bias": (fc1,),
        "mlp.fc2.weight": (h, f),
        "output.weight": (cfg.vocab_size, h),
        "head.weight": (cfg.num_head_outputs, h),
        "head.bias": (cfg.num_head_outputs,),
    }
    key = name.split(".", 2)[2] if name.startswith("layers.") else name
    # Norm weights/biases and the row-parallel biases are [h].
    return shapes.get(key, (h,))


def stage_param_names(cfg: ModelConfig, pp: int, pp_rank: int) -> list[str]:
    """Names of the parameters that pipeline stage `pp_rank` holds."""
    start, end = layer_range(cfg.num_layers, pp, pp_rank)
    pre, post = pp_rank == 0, pp_rank == pp - 1
    names = []
    for name in sharding_plan(cfg, 1):
        if name.startswith("embedding."):
            keep = pre
        elif name.startswith("layers."):
            keep = start <= int(name.split(".")[1]) < end
        elif name.startswith(("final_norm.", "head.")):
            keep = post
        else:  # output.weight
            keep = has_output_weight(cfg, pre, post)
        if keep:
            names.append(name)
    return names


def init_full_parameter(name: str, shape, cfg: ModelConfig, seed: int) -> torch.Tensor:
    """Deterministic full (unsharded) initial value of parameter `name`.

    Each tensor has its own generator seeded from (seed, name), so the initial model is the same for
    every TP x PP layout. A tied `output.weight` copy is initialized as the embedding it mirrors.
    """
    if name == "output.weight" and cfg.tie_embeddings:
        name = "embedding.word.weight"
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    if is_adapter(name):
        # PEFT's LoRA init: B = 0 (the adapted model starts as the base), A ~ kaiming_uniform
        # (a = sqrt(5)), i.e. U(-1/sqrt(in), 1/sqrt(in)) over A's full input width.
        if name.endswith(".b"):
            return torch.zeros(shape)
        g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
        bound = 1.0 / shape[1] ** 0.5
        return (torch.rand(shape, generator=g) * 2.0 - 1.0) * bound
    if name.endswith(".bias"):
        return torch.zeros(shape)
    if name == "head.weight":
        # Scalar head: std 1/sqrt(h + 1) keeps initial scores O(1) (as in TRL / OpenRLHF).
        g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
        return torch.randn(shape, generator=g) / (cfg.hidden_size + 1) ** 0.5
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    std = cfg.init_std
    if name.endswith(("attention.proj.weight", "mlp.fc2.weight")):
        std = std / (2.0 * cfg.num_layers) ** 0.5
    out = torch.randn(shape, generator=g) * std
    if name in ("embedding.word.weight", "output.weight"):
        out[cfg.vocab_size :] = 0.0
    return out


# --------------------------------------------------------------------------- the model


class Embedding(nn.Module):
    """Word (vocab-parallel) plus, for gpt2, learned position embeddings; then dropout."""

    def __init__(self, cfg: ModelConfig, padded_vocab: int, ps: ParallelState):
        super().__init__()
        self.word = VocabParallelEmbedding(
            padded_vocab, cfg.hidden_size, ps.tp_rank, ps.tp_size, ps.tp_group
        )
        self.position = (
            nn.Embedding(cfg.max_seq_len, cfg.hidden_size) if cfg.family == "gpt2" else None
        )
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        x = self.word(ids)
        if self.position is not None:
            x = x + self.position(position_ids)
        return self.dropout(x)


class OutputLayer(nn.Module):
    """Holds `output.weight` when the output layer is not the embedding itself."""

    def __init__(self, local_vocab: int, hidden: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(local_vocab, hidden))


class ScalarHead(nn.Module):
    """Tensor-parallel scalar head: `[b, s, h] -> [b, s, num_outputs]`.

    The hidden state is replicated across TP; rank r holds columns `sizes[r]` of the weight, dots
    its slice of the hidden state, and the partial scores are summed over the TP group. The bias
    (replicated) is where reward normalization lives.
    """

    def __init__(self, cfg: ModelConfig, spec: ShardSpec, ps: ParallelState):
        super().__init__()
        self.group, self.sizes = ps.tp_group, spec.parts[0]
        self.weight = nn.Parameter(torch.empty(cfg.num_head_outputs, spec.local_size(ps.tp_rank)))
        self.bias = nn.Parameter(torch.zeros(cfg.num_head_outputs))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        local = scatter_to_tensor_parallel_region(h, self.group, self.sizes)
        scores = reduce_from_tensor_parallel_region(F.linear(local, self.weight), self.group)
        return scores + self.bias


class GPTModel(nn.Module):
    """One pipeline stage of a tensor-parallel GPT.

    Args:
        cfg: model shape and family.
        ps: the parallel layout this model lives in (TP group for its layers, pp rank for its
            stage).
        pre_process: build embeddings (default: first pipeline stage).
        post_process: build final norm and output layer (default: last pipeline stage).
        seed: initialization and dropout seed (the same on every rank).
        skip_init: leave parameters uninitialized (their values are about to be loaded).

    Attributes read by LoRA checkpoints (`checkpoint/lora_shards.py`): `seed`, and
    `base_checkpoint`, the checkpoint the frozen weights were loaded from (set by
    `checkpoint.init_from.load_init_weights`; None: they are the seeded initialization).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        ps: ParallelState,
        pre_process: bool | None = None,
        post_process: bool | None = None,
        seed: int = 1234,
        skip_init: bool = False,
    ):
        super().__init__()
        self.cfg, self.ps = cfg, ps
        self.pre_process = ps.is_first_stage if pre_process is None else pre_process
        self.post_process = ps.is_last_stage if post_process is None else post_process
        tp, group = ps.tp_size, ps.tp_group
        self.padded_vocab = padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, tp)
        self.plan = sharding_plan(cfg, tp) | lora_sharding_plan(cfg, tp)
        self.seed, self.base_checkpoint = seed, None
        self.layer_start, self.layer_end = layer_range(cfg.num_layers, ps.pp_size, ps.pp_rank)
        self.rng = RNGStatesTracker(tensor_parallel_seed(seed, ps))

        if self.pre_process:
            self.embedding = Embedding(cfg, self.padded_vocab, ps)
        self.layers = nn.ModuleDict(
            {
                str(i): TransformerLayer(
                    cfg,
                    self.plan[f"layers.{i}.attention.qkv.weight"],
                    self.plan[f"layers.{i}.mlp.fc1.weight"],
                    ps.tp_rank,
                    group,
                    self.rng,
                )
                for i in range(self.layer_start, self.layer_end)
            }
        )
        local_vocab = self.padded_vocab // tp
        if self.post_process:
            self.final_norm = make_norm(cfg)
            if cfg.head == "scalar":
                self.head = ScalarHead(cfg, self.plan["head.weight"], ps)
            if has_output_weight(cfg, self.pre_process, self.post_process):
                self.output = OutputLayer(local_vocab, cfg.hidden_size)
            # Columns of this rank's logits that lie beyond the real vocabulary.
            ids = torch.arange(local_vocab) + ps.tp_rank * local_vocab
            self.register_buffer("vocab_padding", ids >= cfg.vocab_size, persistent=False)
            self.has_vocab_padding = bool(self.vocab_padding.any())
        if not skip_init:
            self.reset_parameters(seed)
        self.to(cfg.torch_dtype)
        if cfg.lora.enabled:
            for name, p in self.named_parameters():
                p.requires_grad_(lora_trainable(cfg, name))

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """Initialize every parameter as its shard of the layout-independent full tensor."""
        for name, p in self.named_parameters():
            spec = self.plan[name]
            full_shape = list(p.shape)
            if spec is not None:
                full_shape[spec.dim] = spec.full_size
            full = init_full_parameter(name, full_shape, self.cfg, seed)
            p.copy_(shard_tensor(full, spec, self.ps.tp_rank))

    @property
    def num_local_layers(self) -> int:
        return self.layer_end - self.layer_start

    def word_embedding_weight(self) -> torch.Tensor:
        """The weight the output layer multiplies by (the embedding itself when tied)."""
        if hasattr(self, "output"):
            return self.output.weight
        return self.embedding.word.weight

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        kv_cache=None,
        last_only: bool = False,
        output_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run this stage.

        Args:
            input_ids: [b, s] token ids (first stage).
            hidden_states: [b, s, h] output of the previous stage (other stages).
            attention_mask: [b, s] 1 for real tokens, 0 for padding (left or right).
            position_ids: [b, s]; default: counted over valid tokens (left padding aware).
            segment_ids: [b, s] packed-sample ids; attention stays within equal ids.
            kv_cache: a KVCache; the new keys/values are appended and attended after the old.
            last_only: on the last stage, the head runs on the last position only (output
                [b, 1, ...]): a generation prefill needs only the next token's logits.
            output_index: [N] flat indices into the b * s positions: the head runs on those
                only (output [N, ...]); PPO reads logits only where a response token is
                predicted, so the prompt positions cost no head matmul, forward or backward.
        Returns:
            On the last stage: the logits shard [b, s, padded_vocab / tp] (head "lm") or scores
            [b, s, num_head_outputs] (head "scalar"); on other stages hidden [b, s, h].
        """
        ref = input_ids if self.pre_process else hidden_states
        b, s = ref.shape[:2]
        offset = 0 if kv_cache is None else kv_cache.length
        if kv_cache is not None:
            kv_cache.reserve(s, attention_mask)
            key_valid = kv_cache.key_valid[:, : offset + s] if kv_cache.padded else None
        else:
            key_valid = attention_mask
        if position_ids is None:
            position_ids = self._default_positions(b, s, attention_mask, kv_cache, ref.device)
        mask = build_attention_mask(s, key_valid, segment_ids, offset=offset)

        x = self.embedding(input_ids, position_ids) if self.pre_process else hidden_states
        rope = None
        if self.cfg.family == "llama":
            rope = rotary_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_base, x.dtype)
        for j, layer in enumerate(self.layers.values()):
            x = self._run_layer(layer, x, rope, mask, kv_cache, j)
        if kv_cache is not None:
            kv_cache.advance(s)
        if not self.post_process:
            return x
        if last_only:
            x = x[:, -1:]
        if output_index is not None:
            x = x.reshape(-1, x.shape[-1]).index_select(0, output_index)
        if self.cfg.head == "scalar":
            return self.head(self.final_norm(x))
        return self.logits(self.final_norm(x))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel logits of normalized hidden states, padding columns masked."""
        logits = F.linear(
            copy_to_tensor_parallel_region(h, self.ps.tp_group), self.word_embedding_weight()
        )
        if self.has_vocab_padding:
            logits = logits.masked_fill(self.vocab_padding, torch.finfo(logits.dtype).min)
        return logits

    def _default_positions(self, b, s, attention_mask, kv_cache, device):
        offset = 0 if kv_cache is None else kv_cache.length
        if attention_mask is None:
            return torch.arange(offset, offset + s, device=device).expand(b, s)
        before = None
        if kv_cache is not None and offset > 0:
            before = kv_cache.key_valid[:, :offset].sum(-1)
        return positions_from_mask(attention_mask, before)

    def _run_layer(self, layer, x, rope, mask, kv_cache, j):
        if not (self.cfg.activation_recompute and self.training and torch.is_grad_enabled()):
            return layer(x, rope, mask, kv_cache, j, self.rng)
        # Recompute in backward. torch's checkpoint restores the default RNG; the TP stream is
        # restored here so recomputed dropout masks equal the first forward's.
        start_state, calls = self.rng.get_state(), [0]

        def run(x_):
            calls[0] += 1
            if calls[0] == 1:
                return layer(x_, rope, mask, kv_cache, j, self.rng)
            now = self.rng.get_state()
            self.rng.set_state(start_state)
            try:
                return layer(x_, rope, mask, kv_cache, j, self.rng)
            finally:
                self.rng.set_state(now)

        return checkpoint(run, x, use_reentrant=False, preserve_rng_state=True)

    def sync_tied_embedding_grads(self) -> None:
        """With pp > 1 and tied embeddings, first and last stage each hold a copy of the word
        embedding: sum their gradients so both copies take the same step."""
        tied = self.cfg.tie_embeddings and self.cfg.head == "lm"  # a scalar head has no copy
        if self.ps.embedding_group is None or not tied:
            return
        if not (self.pre_process or self.post_process):
            return
        w = self.embedding.word.weight if self.pre_process else self.output.weight
        if w.grad is not None:
            dist.all_reduce(w.grad, group=self.ps.embedding_group)
