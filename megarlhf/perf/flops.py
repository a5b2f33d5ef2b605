"""FLOPs of the model's passes: the Megatron-LM formula, generalized to LLaMA blocks.

Megatron-LM (Narayanan et al., 2021, "Efficient Large-Scale Language Model Training on GPU
Clusters", appendix) counts only matrix multiplications, two FLOPs per multiply-add, the causal
attention scores as a full s x s square, and gives for one training iteration of a GPT with
activation recomputation

    F = 96 B s l h^2 (1 + s / (6 h) + V / (16 l h))

(B batch, s sequence, l layers, h hidden, V vocabulary). It is the sum of, per forward pass,
    24 B s h^2   per layer: QKV (6Bsh^2), attention output (2Bsh^2), MLP 4h (16Bsh^2)
     4 B s^2 h   per layer: scores Q K^T and the weighted sum of V
     2 B s h V   the logits
with backward = 2 x forward and recomputation = one more forward of the layers (not the logits):
    train      = 3 x (layers + logits)             = 72 B s l h^2 (1 + s/(6h) + V/(12 l h))
    recompute  = 4 x layers + 3 x logits           = 96 B s l h^2 (1 + s/(6h) + V/(16 l h))
so "x 4/3 with recomputation" holds for the layer part. Here the per-layer weight term is computed
from the actual shapes, which gives Megatron's 24 B s h^2 for GPT-2 blocks (ffn = 4h, kv = h) and
the right count for LLaMA blocks (grouped KV heads, three SwiGLU matrices of width ffn). Biases,
norms, softmax and activations are not counted (as in Megatron). `megatron_train_flops` is the
closed formula itself, which tests compare against.
"""

from __future__ import annotations

from megarlhf.config import ModelConfig


def layer_matmul_params(cfg: ModelConfig) -> int:
    """Weights one token multiplies through in one transformer block (no biases / norms)."""
    h, kv = cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim
    attn = h * (h + 2 * kv) + h * h  # QKV, output projection
    mlp_mats = 3 if cfg.family == "llama" else 2  # SwiGLU gate+up+down vs fc1+fc2
    return attn + mlp_mats * h * cfg.ffn_hidden_size


def head_width(cfg: ModelConfig) -> int:
    """Output columns of the head: the vocabulary (lm) or the scalar outputs."""
    return cfg.vocab_size if cfg.head == "lm" else cfg.num_head_outputs


def forward_flops(cfg: ModelConfig, batch: int, seq: int, head_tokens: int | None = None) -> float:
    """One forward pass over [batch, seq] tokens.

    Args:
        head_tokens: tokens per row that go through the output head (default: all `seq`).
    """
    h, nl = cfg.hidden_size, cfg.num_layers
    head_tokens = seq if head_tokens is None else head_tokens
    layers = nl * (2.0 * batch * seq * layer_matmul_params(cfg) + 4.0 * batch * seq * seq * h)
    return layers + 2.0 * batch * head_tokens * h * head_width(cfg)


def train_flops(
    cfg: ModelConfig,
    batch: int,
    seq: int,
    recompute: bool | None = None,
    head_tokens: int | None = None,
) -> float:
    """Forward + backward (2 x forward) over [batch, seq]; + one layer forward when recomputing.
    `head_tokens` as in `forward_flops`."""
    recompute = cfg.activation_recompute if recompute is None else recompute
    full = forward_flops(cfg, batch, seq, head_tokens)
    layers = forward_flops(cfg, batch, seq, head_tokens=0)
    return 3.0 * full + (layers if recompute else 0.0)


def generate_flops(cfg: ModelConfig, batch: int, prompt_len: int, new_tokens: int) -> float:
    """KV-cache generation: a prefill over the prompt (logits of its last position only), then one
    token per row per step attending to everything before it."""
    h, nl = cfg.hidden_size, cfg.num_layers
    total = forward_flops(cfg, batch, prompt_len, head_tokens=1)
    per_token = 2.0 * batch * (nl * layer_matmul_params(cfg) + h * head_width(cfg))
    for t in range(1, new_tokens):  # the first new token comes out of the prefill
        total += per_token + nl * 4.0 * batch * (prompt_len + t) * h
    return total


def megatron_train_flops(
    batch: int, seq: int, layers: int, hidden: int, vocab: int, recompute: bool
) -> float:
    """The closed Megatron formula (GPT-2 blocks): 72 or 96 B s l h^2 (1 + s/6h + V/(12|16) l h)."""
    b, s, nl, h, v = batch, seq, layers, hidden, vocab
    if recompute:
        return 96.0 * b * s * nl * h * h * (1 + s / (6 * h) + v / (16 * nl * h))
    return 72.0 * b * s * nl * h * h * (1 + s / (6 * h) + v / (12 * nl * h))


def ppo_iteration_flops(
    actor: ModelConfig,
    critic: ModelConfig | None,
    reward: ModelConfig | None,
    batch: int,
    prompt_len: int,
    response_len: int,
    ppo_epochs: int,
    ptx_rows: int = 0,
    ptx_seq: int = 0,
) -> dict[str, float]:
    """FLOPs of one PPO iteration by stage (the keys are the benchmark's stage names).

    Generation, then forward passes over [batch, prompt + response] of the actor (old log-probs),
    the reference (the actor's shape), the critic and the reward model, then `ppo_epochs` training
    passes of the actor (plus `ptx_rows` PTX rows of `ptx_seq` tokens) and the critic. The heads
    run where their outputs are read, as the trainer runs them: the LM head and the critic's head
    at the positions that predict a response token, the reward head at the last token.
    """
    s, n = prompt_len + response_len, response_len
    out = {
        "generate": generate_flops(actor, batch, prompt_len, response_len),
        "actor_forward": forward_flops(actor, batch, s, n),
        "reference_forward": forward_flops(actor, batch, s, n),
        "critic_forward": forward_flops(critic, batch, s, n) if critic is not None else 0.0,
        "reward_forward": forward_flops(reward, batch, s, 1) if reward is not None else 0.0,
        "actor_update": ppo_epochs
        * (
            train_flops(actor, batch, s, head_tokens=n)
            + (train_flops(actor, ptx_rows, ptx_seq) if ptx_rows else 0)
        ),
        "critic_update": (
            ppo_epochs * train_flops(critic, batch, s, head_tokens=n) if critic is not None else 0.0
        ),
    }
    out["total"] = sum(out.values())
    return out
