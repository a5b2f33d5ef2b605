"""Transformer block of the GPT-2 and LLaMA families, tensor-parallel over attention heads and the
MLP's inner width (Megatron's column-then-row pattern: one all-reduce per sub-block forward).

With `model.lora.rank > 0` the linears named in `model.lora.target_modules` carry a LoRAAdapter
(megarlhf.parallel.layers), sharded like their weights."""

from __future__ import annotations

import contextlib
import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

from megarlhf.config import ModelConfig
from megarlhf.model.attention import attention
from megarlhf.model.rotary import apply_rotary
from megarlhf.parallel.layers import ColumnParallelLinear, LoRAAdapter, RowParallelLinear
from megarlhf.parallel.sharding import ShardSpec


def _importable(name: str) -> bool:
    """True if `name` (possibly dotted) can be found; the PyPI package named `apex` is not
    NVIDIA apex, so callers probe the submodule they need."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


# Optional accelerators, used only on CUDA tensors; CPU always takes the torch path (flash-attn's
# probe lives with the attention implementations in attention.py).
HAVE_APEX_NORM = _importable("apex") and _importable("apex.normalization.fused_layer_norm")


class LayerNorm(nn.Module):
    """LayerNorm with weight and bias (torch's kernel; apex's fused one on CUDA when importable)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if HAVE_APEX_NORM and x.is_cuda:
            from apex.normalization.fused_layer_norm import fused_layer_norm_affine

            return fused_layer_norm_affine(x, self.weight, self.bias, self.weight.shape, self.eps)
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back before the weight, exactly as HF LLaMA does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if HAVE_APEX_NORM and x.is_cuda:
            from apex.normalization.fused_layer_norm import fused_rms_norm_affine

            return fused_rms_norm_affine(x, self.weight, self.weight.shape, self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    cls = LayerNorm if cfg.family == "gpt2" else RMSNorm
    return cls(cfg.hidden_size, cfg.norm_eps)


def make_adapter(cfg: ModelConfig, target: str, local_in, local_out, group, split_input, rng):
    """The LoRAAdapter of linear `target` (qkv, proj, fc1, fc2), or None where it has none.

    split_input: a row-parallel linear (its input, and A, are sharded)."""
    lora = cfg.lora
    if not lora.enabled or target not in lora.target_modules:
        return None
    return LoRAAdapter(
        lora.rank, local_in, local_out, lora.scale, lora.dropout, group, split_input, rng
    )


class ParallelAttention(nn.Module):
    """Self-attention over this rank's heads: fused QKV (column-parallel), RoPE (llama), the
    attention kernel of `model.attention` (attention.py), output projection (row-parallel)."""

    def __init__(self, cfg: ModelConfig, qkv_spec: ShardSpec, tp_rank: int, group, rng=None):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        q, k, _ = (part[tp_rank] for part in qkv_spec.parts)
        self.local_heads, self.local_kv_heads = q // hd, k // hd
        bias = cfg.family == "gpt2"
        h = cfg.hidden_size
        qkv_lora = make_adapter(cfg, "qkv", h, q + 2 * k, group, False, rng)
        self.qkv = ColumnParallelLinear(h, q + 2 * k, group, bias=bias, lora=qkv_lora)
        proj_lora = make_adapter(cfg, "proj", q, h, group, True, rng)
        self.proj = RowParallelLinear(q, h, group, bias=bias, lora=proj_lora)

    def forward(self, x, rope, mask, kv_cache, layer_idx, rng):
        b, s, _ = x.shape
        hd, nq, nkv = self.cfg.head_dim, self.local_heads, self.local_kv_heads
        q, k, v = self.qkv(x).split([nq * hd, nkv * hd, nkv * hd], dim=-1)
        q = q.view(b, s, nq, hd).transpose(1, 2)
        k = k.view(b, s, nkv, hd).transpose(1, 2)
        v = v.view(b, s, nkv, hd).transpose(1, 2)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if kv_cache is not None:
            k, v = kv_cache.update(layer_idx, k, v)
        p = self.cfg.attention_dropout if self.training else 0.0
        # Attention probabilities are sharded by head: dropout must differ per TP rank.
        with rng.fork() if p > 0 else contextlib.nullcontext():
            out = attention(q, k, v, mask, p, self.cfg.attention, self.cfg.use_flash_attn)
        return self.proj(out.transpose(1, 2).reshape(b, s, nq * hd))


class ParallelMLP(nn.Module):
    """GPT-2: fc2(gelu_tanh(fc1 x)); LLaMA: fc2(silu(gate) * up) with fc1 = [gate | up] fused."""

    def __init__(self, cfg: ModelConfig, fc1_spec: ShardSpec, tp_rank: int, group, rng=None):
        super().__init__()
        self.gated = cfg.family == "llama"
        local_fc1 = fc1_spec.local_size(tp_rank)
        local_ffn = local_fc1 // 2 if self.gated else local_fc1
        bias = cfg.family == "gpt2"
        h = cfg.hidden_size
        fc1_lora = make_adapter(cfg, "fc1", h, local_fc1, group, False, rng)
        self.fc1 = ColumnParallelLinear(h, local_fc1, group, bias=bias, lora=fc1_lora)
        fc2_lora = make_adapter(cfg, "fc2", local_ffn, h, group, True, rng)
        self.fc2 = RowParallelLinear(local_ffn, h, group, bias=bias, lora=fc2_lora)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        return self.fc2(h)


class TransformerLayer(nn.Module):
    """Pre-norm block: x + drop(attn(norm(x))), then + drop(mlp(norm(.))).

    rng: the model's TP-stream tracker, for the dropout of row-parallel adapters' inputs."""

    def __init__(
        self, cfg: ModelConfig, qkv_spec: ShardSpec, fc1_spec, tp_rank: int, group, rng=None
    ):
        super().__init__()
        self.input_norm = make_norm(cfg)
        self.attention = ParallelAttention(cfg, qkv_spec, tp_rank, group, rng)
        self.post_attention_norm = make_norm(cfg)
        self.mlp = ParallelMLP(cfg, fc1_spec, tp_rank, group, rng)
        # Residual activations are replicated across TP: default stream, same mask everywhere.
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x, rope, mask, kv_cache, layer_idx, rng):
        x = x + self.dropout(
            self.attention(self.input_norm(x), rope, mask, kv_cache, layer_idx, rng)
        )
        return x + self.dropout(self.mlp(self.post_attention_norm(x)))
