"""Model configuration: the shape and flavour of a GPT (GPT-2 or LLaMA family) and the parallel
layout of the training job."""

from __future__ import annotations

from dataclasses import dataclass, field

from megarlhf.config.loader import check

# The block's linears an adapter can sit on: the fused attention input (column-parallel), the
# attention output projection (row-parallel), the MLP's first (column) and second (row) layer.
LORA_TARGETS = ("qkv", "proj", "fc1", "fc2")


@dataclass
class LoRAConfig:
    """Low-rank adapters (LoRA, Hu et al. 2021) on the transformer block's linears.

    With rank r > 0 every targeted weight W [out, in] computes W x + (alpha / r) B A drop(x) with
    A [r, in] and B [out, r] trained and everything else frozen (a scalar head, which starts
    fresh, trains too). docs/lora.md gives the sharding and what a checkpoint holds.
    """

    # Rank r of every adapter; 0 means no adapters (the whole model trains).
    rank: int = 0
    # Scaling numerator: the update is (alpha / rank) * B A (PEFT's lora_alpha).
    alpha: float = 16.0
    # Dropout on the adapter's input only (the frozen path sees the undropped input).
    dropout: float = 0.0
    # Linears that get adapters, any of qkv, proj, fc1, fc2.
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))

    def __post_init__(self) -> None:
        check(self.rank >= 0, "rank", f"must be >= 0 (0: no adapters), got {self.rank}")
        check(self.alpha > 0, "alpha", f"must be > 0, got {self.alpha}")
        check(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        bad = [t for t in self.target_modules if t not in LORA_TARGETS]
        check(not bad, "target_modules", f"{bad} not among {'|'.join(LORA_TARGETS)}")
        check(bool(self.target_modules), "target_modules", "must name at least one linear")
        check(
            len(set(self.target_modules)) == len(self.target_modules),
            "target_modules",
            f"{self.target_modules} names a linear twice",
        )

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        """alpha / rank, the factor of B A (0 when off)."""
        return self.alpha / self.rank if self.rank else 0.0


@dataclass
class ModelConfig:
    """Shape and flavour of a GPT model (GPT-2 or LLaMA family)."""

    # "gpt2" (learned positions, LayerNorm, GELU, biases) or "llama" (RoPE, RMSNorm, SwiGLU).
    family: str = "gpt2"
    # Real vocabulary size (before padding for tensor parallelism).
    vocab_size: int = 512
    # Model width.
    hidden_size: int = 64
    # Number of transformer blocks.
    num_layers: int = 2
    # Attention (query) heads.
    num_heads: int = 4
    # Key/value heads (grouped-query attention); 0 means equal to num_heads.
    num_kv_heads: int = 0
    # MLP inner width; 0 means 4*hidden (gpt2) or the LLaMA 8/3*hidden rounded to 256.
    ffn_hidden_size: int = 0
    # Longest sequence (prompt + response) the model sees; sizes position tables and caches.
    max_seq_len: int = 256
    # Epsilon of LayerNorm / RMSNorm.
    norm_eps: float = 1e-5
    # RoPE base frequency (llama only).
    rope_base: float = 10000.0
    # Share the input embedding with the output layer.
    tie_embeddings: bool = True
    # Dropout on hidden states (residual branches and embeddings).
    hidden_dropout: float = 0.0
    # Dropout on attention probabilities.
    attention_dropout: float = 0.0
    # Std of the normal initializer (output projections are scaled by 1/sqrt(2*num_layers)).
    init_std: float = 0.02
    # The padded vocabulary is a multiple of this times the TP size (see model.vocab_padding).
    make_vocab_size_divisible_by: int = 128
    # Recompute each block's activations in backward instead of storing them.
    activation_recompute: bool = False
    # Parameter/activation dtype: "fp32" or "bf16".
    dtype: str = "fp32"
    # Use flash-attn when importable on CUDA (falls back to torch SDPA otherwise).
    use_flash_attn: bool = True
    # Attention kernel: "auto" (flash-attn on CUDA half precision, else SDPA; on CPU the explicit
    # "math" path in bf16, which is about 3x faster there, and SDPA in fp32), "sdpa", "math".
    attention: str = "auto"
    # Output head: "lm" (vocab-parallel logits) or "scalar" (reward / value head, per token).
    head: str = "lm"
    # Outputs of the scalar head (several for multi-attribute rewards).
    num_head_outputs: int = 1
    # Low-rank adapters (model.lora.rank > 0): train them only, the base weights stay frozen.
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def __post_init__(self) -> None:
        check(self.family in ("gpt2", "llama"), "family", f"{self.family!r} not gpt2|llama")
        for k in ("vocab_size", "hidden_size", "num_layers", "num_heads", "max_seq_len"):
            check(getattr(self, k) > 0, k, f"must be > 0, got {getattr(self, k)}")
        if self.num_kv_heads == 0:
            self.num_kv_heads = self.num_heads
        check(
            self.hidden_size % self.num_heads == 0,
            "hidden_size",
            f"{self.hidden_size} is not divisible by model.num_heads={self.num_heads}",
        )
        check(
            self.num_heads % self.num_kv_heads == 0,
            "num_kv_heads",
            f"model.num_heads={self.num_heads} is not a multiple of {self.num_kv_heads}",
        )
        if self.ffn_hidden_size == 0:
            if self.family == "gpt2":
                self.ffn_hidden_size = 4 * self.hidden_size
            else:
                self.ffn_hidden_size = 256 * ((8 * self.hidden_size // 3 + 255) // 256)
        check(self.dtype in ("fp32", "bf16"), "dtype", f"{self.dtype!r} not fp32|bf16")
        check(self.head in ("lm", "scalar"), "head", f"{self.head!r} not lm|scalar")
        check(self.num_head_outputs >= 1, "num_head_outputs", "must be >= 1")
        check(
            self.attention in ("auto", "sdpa", "math", "flash"),
            "attention",
            f"{self.attention!r} not auto|sdpa|math|flash",
        )
        for k in ("hidden_dropout", "attention_dropout"):
            check(0.0 <= getattr(self, k) < 1.0, k, "must be in [0, 1)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def torch_dtype(self):
        import torch

        return torch.float32 if self.dtype == "fp32" else torch.bfloat16


@dataclass
class ParallelConfig:
    """Parallel layout of the training job (data-parallel size = world / (tp * pp))."""

    # Tensor-parallel size.
    tp: int = 1
    # Pipeline-parallel size.
    pp: int = 1

    def __post_init__(self) -> None:
        check(self.tp >= 1, "tp", f"must be >= 1, got {self.tp}")
        check(self.pp >= 1, "pp", f"must be >= 1, got {self.pp}")


@dataclass
class ModelFileConfig:
    """A config file that only describes a model (the presets in configs/models/)."""

    model: ModelConfig = field(default_factory=ModelConfig)
