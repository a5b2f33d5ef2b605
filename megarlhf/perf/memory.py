"""Per-GPU memory model of a PPO job (actor, critic, reference, reward model, hybrid engine).

Pure functions and dataclasses; `tools/plan.py` is the command line around them. Every number is a
byte count on ONE GPU: the busiest rank (TP rank 0, the pipeline stage with the most parameters,
the first stage for activations), in the job's steady state (optimizer states exist; gradients
are freed after each optimizer step, as DeepSpeed does).

Training state per parameter P held by a rank (ZeRO partitions over the data-parallel size d):

    bf16 (mixed precision, the 16-byte rule): weights 2, grads 2, fp32 master 4, Adam m 4, v 4
        ZeRO 1: master + m + v / d; ZeRO 2: and grads / d; ZeRO 3: and weights / d
    fp32, ZeRO 0: weights 4, grads 4, m 4, v 4 (torch AdamW on the parameters themselves)
    fp32, ZeRO >= 1: DeepSpeed still keeps its own fp32 copy of the partition (measured: the engine
        adds 4 bytes/param at dp = 1), so 4 + 4 + (4 + 8) / d = 20 bytes/param at d = 1.

Transients at the optimizer step (measured on CPU, see docs/plan.md):
    ZeRO 0: DeepSpeed all-reduces the gradients through a flattened copy (buckets of up to 5e8
        elements), even at dp = 1: + P * grad bytes.
    ZeRO 1/2: the flat fp32 gradient partition (4 P / d); torch's single-tensor AdamW then runs
        over that ONE flat tensor, so its sqrt/division temporaries are partition-sized
        (+ 8 P / d; measured 12 P / d in all). DeepSpeed's FusedAdam (GPU) has no temporaries:
        4 P / d plus the partition flattened in the gradient dtype.

Activations saved for backward per layer, per micro-batch, in bytes; x = b s h, e = bytes of the
model dtype, t = TP, kv = key/value width, f = MLP width. This is what OUR blocks save (listed with
`torch.autograd.graph.saved_tensors_hooks`), not Korthikanti et al. (2022)'s s b h (34 + 5 a s / h)
(16-bit, no sequence parallelism), whose 5 a s^2 b term is the stored attention matrix: our SDPA /
flash attention never stores it. What it does store instead, when a padding mask is given (PPO
always left-pads prompts), is the mask converted to an additive float bias [b, 1, s, s] in the model
dtype, once per layer and not split by TP: b s^2 e.

    gpt2:  e x (2 + 2 [norm inputs, linear inputs] + (h + 2 kv) / (h t) [fused qkv]
               + 1/t [attention output = projection input] + 2 f / (h t) [GELU in, out])
    llama: (4 + 2e) x per RMSNorm (fp32 input copy, normalized, weighted) x 2
           + e x ((h + 2 kv) / (h t) [qkv] + (h + kv) / (h t) [RoPE'd q, k]
               + 1/t [attention output] + 4 f / (h t) [fc1 out (gate|up), silu, product])
    both:  + b s^2 e (padding mask) + 4 b a s / t (log-sum-exp of the attention)

(In fp32, RMSNorm's fp32 input is the residual itself, so the same formula gives 3 x 4 bytes.)
With full recomputation only each layer's input e x is kept, plus one layer's activations while
it is recomputed in backward. Korthikanti's 2 s b h per layer (16-bit) is that input.

With pipeline parallelism (1F1B) the first stage holds min(pp, micro-batches) micro-batches of its
layers in flight. The output head (last stage) saves its normalized input and the logits shard
[b, s, V / t] in the model dtype; the fused log-prob / cross-entropy kernels never make an fp32
copy (so no b s V / t fp32 buffer), but at the start of backward three logits-sized buffers are
alive (the logits, the gradient of the slice the loss reads, the full gradient it scatters into;
measured), and in a forward with vocabulary padding (`make_vocab_size_divisible_by * t` does not
divide V) `masked_fill` briefly holds a second copy.

Phases of one PPO step; the peak is the max over them:
    rollout:    resident + generation copy of the actor (tp_g, no ZeRO; none when the layouts
                are equal and the actor generates in place) + then either ZeRO 3's gathered full
                actor (while the copy is filled) or the KV cache plus the larger of the prefill
                working set (one layer's no-grad tensors) and the sampling buffers.
    experience: resident + forward-only passes of actor, reference, critic, reward model, one at a
                time (a frozen model offloaded to CPU counts only while it is in use).
    training:   resident + for the actor, then the critic: max(start of backward: activations +
                logits + their gradient, end of backward: gradients + optimizer-step transients).
Resident = the colocated models' weights and optimizer states (not the offloaded frozen models).

LoRA (`lora_rank` r > 0, adapters on `lora_targets`, as model.lora): actor and critic hold their
frozen base plus the adapter factors as weights (model dtype, never ZeRO-partitioned: ZeRO 3 is
refused with LoRA, as DeepSpeedModel does), but gradients, the fp32 master, Adam's moments, the
reduce bucket and the step's transients exist only for what trains: the adapters, and the
critic's scalar head (`local_trainable_count`). An adapter on W [out, in] is A [r, in] and
B [out, r], sharded like W (`gpt.lora_sharding_plan`). The reference is the actor with its
adapters off, so it has no weights of its own (its forward pass still counts in the experience
phase); the reward model stays a full frozen model. Each adapter saves its [b, s, r] product
x A^T for B's gradient (its input x is the base linear's, saved once). The generation copy is the
merged model (no adapters). The step-time model still counts full-weight backward FLOPs.

Simplifications: no sequence parallelism, no context parallelism; dropout masks are not counted
(the presets and PPO use no dropout); ZeRO 3's live working set is modeled as two layers' gathered
weights; the experience buffers are counted as 12 fp32 [b, s]
tensors; CUDA context, NCCL buffers and allocator fragmentation are the caller's reserve.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from megarlhf.config import ModelConfig
from megarlhf.config.model import LORA_TARGETS, LoRAConfig
from megarlhf.model.gpt import (
    full_param_shape,
    layer_range,
    lora_sharding_plan,
    lora_trainable,
    padded_vocab_size,
    sharding_plan,
    stage_param_names,
)
from megarlhf.perf.flops import ppo_iteration_flops

ROLES = ("actor", "critic", "reference", "reward")
GIB = 1024**3
# DeepSpeed's defaults as DeepSpeedModel configures them (elements).
ZERO0_ALLREDUCE_BUCKET = 500_000_000
REDUCE_BUCKET = 50_000_000


class PlanError(ValueError):
    """An input of the plan is wrong; `field` names it (the CLI maps it to its flag)."""

    def __init__(self, field_name: str, msg: str):
        super().__init__(f"{field_name}: {msg}")
        self.field = field_name


@dataclass(frozen=True)
class PlanSpec:
    """One PPO job to plan. Field names are the planner's flags without dashes."""

    # The actor's shape (critic and reward model: the same trunk with a scalar head).
    model: ModelConfig
    # GPUs in the job and the memory of each (GiB).
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_mem: float = 80.0
    # Training layout; dp = world / (tp * pp).
    tp: int = 1
    pp: int = 1
    dp: int = 8
    # ZeRO stage of actor and critic.
    zero: int = 1
    # "bf16" (mixed precision) or "fp32".
    dtype: str = "bf16"
    # Full activation recomputation in training.
    recompute: bool = True
    # Rows per micro-batch (training and experience forwards).
    micro_batch: int = 1
    # Prompt and response lengths (tokens; the response is max_new_tokens).
    prompt_len: int = 512
    response_len: int = 512
    # Prompts per PPO step, answers per prompt, minibatches per epoch, epochs.
    rollout_batch: int = 64
    samples_per_prompt: int = 1
    num_minibatches: int = 1
    ppo_epochs: int = 1
    # Generation tensor parallelism (0: tp * pp, as ppo.generation_tp).
    gen_tp: int = 0
    # Roles placed on these GPUs (a role not listed runs elsewhere; the actor must be here).
    colocate: tuple[str, ...] = ROLES
    # GAE with a critic (False: RLOO / GRPO); a reward model (False: a rule reward_fn).
    critic: bool = True
    reward_model: bool = True
    # Keep the frozen models (reference, reward) in CPU memory between uses (ppo.offload_frozen).
    offload_frozen: bool = False
    # "fused" (DeepSpeed FusedAdam on GPU) or "torch" (torch.optim.AdamW, single-tensor).
    optimizer: str = "fused"
    # The training batch carries a padding mask (PPO left-pads prompts): SDPA stores its bias.
    padding_mask: bool = True
    # LoRA rank of actor and critic (0: full fine-tuning) and the linears it adapts.
    lora_rank: int = 0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    # GiB kept free for CUDA context, NCCL, allocator fragmentation (None: 10% of gpu_mem).
    reserve: float | None = None
    # Step-time model: model FLOPs utilization (training, generation) and peak TFLOP/s per GPU.
    mfu: float = 0.4
    gen_mfu: float | None = None
    peak_tflops: float = 989.0

    def __post_init__(self) -> None:
        for k in ("nodes", "gpus_per_node", "tp", "pp", "dp", "micro_batch", "rollout_batch"):
            if getattr(self, k) < 1:
                raise PlanError(k, f"must be >= 1, got {getattr(self, k)}")
        for k in ("prompt_len", "response_len", "samples_per_prompt", "num_minibatches"):
            if getattr(self, k) < 1:
                raise PlanError(k, f"must be >= 1, got {getattr(self, k)}")
        if self.ppo_epochs < 1:
            raise PlanError("ppo_epochs", f"must be >= 1, got {self.ppo_epochs}")
        if self.gpu_mem <= 0:
            raise PlanError("gpu_mem", f"must be > 0 GiB, got {self.gpu_mem}")
        world = self.nodes * self.gpus_per_node
        if self.tp * self.pp * self.dp != world:
            raise PlanError(
                "dp",
                f"tp * pp * dp = {self.tp} * {self.pp} * {self.dp} = "
                f"{self.tp * self.pp * self.dp} is not the world size nodes * gpus_per_node = "
                f"{world}",
            )
        if self.zero not in (0, 1, 2, 3):
            raise PlanError("zero", f"{self.zero} is not one of 0, 1, 2, 3")
        if self.zero == 3 and self.pp > 1:
            raise PlanError("zero", "ZeRO 3 runs with pp = 1 only (DeepSpeedModel)")
        if self.dtype not in ("bf16", "fp32"):
            raise PlanError("dtype", f"{self.dtype!r} not bf16|fp32")
        if self.zero == 0 and self.dtype == "bf16":
            raise PlanError(
                "zero", "ZeRO 0 runs fp32 only (DeepSpeedModel); use zero >= 1 for bf16"
            )
        if self.optimizer not in ("fused", "torch"):
            raise PlanError("optimizer", f"{self.optimizer!r} not fused|torch")
        gen_tp = self.gen_tp or self.tp * self.pp
        if self.gen_tp < 0 or world % gen_tp:
            raise PlanError("gen_tp", f"{gen_tp} does not divide the world size {world}")
        bad = sorted(set(self.colocate) - set(ROLES))
        if bad:
            raise PlanError("colocate", f"unknown role(s) {bad}; roles: {', '.join(ROLES)}")
        if "actor" not in self.colocate:
            raise PlanError("colocate", "must include actor (the plan is for the actor's GPUs)")
        rows = self.rollout_batch * self.samples_per_prompt
        if rows % (self.dp * self.num_minibatches):
            raise PlanError(
                "rollout_batch",
                f"{self.rollout_batch} x samples_per_prompt {self.samples_per_prompt} is not a "
                f"multiple of dp * num_minibatches = {self.dp} * {self.num_minibatches}",
            )
        if self.prompt_len + self.response_len > self.model.max_seq_len:
            raise PlanError(
                "response_len",
                f"prompt_len + response_len = {self.prompt_len + self.response_len} exceeds the "
                f"model's max_seq_len {self.model.max_seq_len}",
            )
        for k in ("mfu", "gen_mfu"):
            v = getattr(self, k)
            if v is not None and not 0 < v <= 1:
                raise PlanError(k, f"must be in (0, 1], got {v}")
        if self.peak_tflops <= 0:
            raise PlanError("peak_tflops", f"must be > 0, got {self.peak_tflops}")
        if self.reserve is not None and not 0 <= self.reserve < self.gpu_mem:
            raise PlanError("reserve", f"must be in [0, gpu_mem), got {self.reserve}")
        self._check_lora()

    def _check_lora(self) -> None:
        if self.model.lora.enabled and not self.lora_rank:  # model.lora.* given with the model
            object.__setattr__(self, "lora_rank", self.model.lora.rank)
            object.__setattr__(self, "lora_targets", tuple(self.model.lora.target_modules))
        if self.lora_rank < 0:
            raise PlanError("lora_rank", f"must be >= 0 (0: no LoRA), got {self.lora_rank}")
        bad = sorted(set(self.lora_targets) - set(LORA_TARGETS))
        if bad or not self.lora_targets:
            raise PlanError(
                "lora_targets", f"{list(self.lora_targets)}: not a non-empty subset of "
                f"{','.join(LORA_TARGETS)}"
            )  # fmt: skip
        if self.lora_rank and self.zero == 3:
            raise PlanError("zero", "ZeRO 3 is refused with LoRA (DeepSpeedModel); use 1 or 2")

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def generation_tp(self) -> int:
        return self.gen_tp or self.tp * self.pp

    @property
    def bytes_per_elem(self) -> int:
        return 2 if self.dtype == "bf16" else 4

    def shape(self, role: str) -> ModelConfig:
        """Model config of a role in this plan's dtype (critic / reward: scalar head; actor and
        critic with this plan's adapters, the frozen roles without)."""
        m = replace(self.model, dtype=self.dtype, activation_recompute=self.recompute)
        lora = LoRAConfig()
        if self.lora_rank and role in ("actor", "critic"):
            lora = LoRAConfig(rank=self.lora_rank, target_modules=list(self.lora_targets))
        m = replace(m, lora=lora)
        if role in ("critic", "reward"):
            m = replace(m, head="scalar", num_head_outputs=1)
        return m

    def roles(self) -> list[str]:
        """Roles that exist in this job."""
        return [
            r
            for r in ROLES
            if (r != "critic" or self.critic) and (r != "reward" or self.reward_model)
        ]


# ----------------------------------------------------------------------------- parameters


def _stage_counts(cfg: ModelConfig, tp: int, pp: int) -> tuple[int, int]:
    """(parameter elements, trained elements) of TP rank 0 on the pipeline stage with the most
    parameters. Under LoRA the parameters include the adapter factors and only they (and a
    scalar head) train; without, everything trains."""
    plan = sharding_plan(cfg, tp) | lora_sharding_plan(cfg, tp)
    adapters = list(lora_sharding_plan(cfg, 1))
    best = (0, 0)
    for stage in range(pp):
        start, end = layer_range(cfg.num_layers, pp, stage)
        names = stage_param_names(cfg, pp, stage)
        names += [n for n in adapters if start <= int(n.split(".")[1]) < end]
        n = trained = 0
        for name in names:
            shape = list(full_param_shape(cfg, name))
            spec = plan[name]
            if spec is not None:
                shape[spec.dim] = spec.local_size(0)
            n += math.prod(shape)
            if not cfg.lora.enabled or lora_trainable(cfg, name):
                trained += math.prod(shape)
        best = max(best, (n, trained))
    return best


def local_param_count(cfg: ModelConfig, tp: int, pp: int) -> int:
    """Parameter elements held by the busiest rank: TP rank 0 (the largest shards, padded
    vocabulary) of the pipeline stage with the most parameters (LoRA: base and adapters)."""
    return _stage_counts(cfg, tp, pp)[0]


def local_trainable_count(cfg: ModelConfig, tp: int, pp: int) -> int:
    """Of `local_param_count`, the elements that train (LoRA: the adapters and a scalar head;
    otherwise all): what gradients, master copy and Adam exist for."""
    return _stage_counts(cfg, tp, pp)[1]


def largest_layer_params(cfg: ModelConfig, tp: int) -> int:
    """Parameter elements of one transformer block on TP rank 0."""
    plan = sharding_plan(cfg, tp)
    n = 0
    for name, spec in plan.items():
        if name.startswith("layers.0."):
            shape = list(full_param_shape(cfg, name))
            if spec is not None:
                shape[spec.dim] = spec.local_size(0)
            n += math.prod(shape)
    return n


@dataclass
class TrainState:
    """Bytes of a trained model's state on one rank."""

    weights: float
    grads: float
    master: float
    optim: float
    step_transient: float

    @property
    def resident(self) -> float:
        """Between steps: weights, fp32 master, Adam states (gradients are freed)."""
        return self.weights + self.master + self.optim


def train_state(
    p: int, spec: PlanSpec, layer_params: int, trainable: int | None = None
) -> TrainState:
    """Weights / gradients / master / Adam bytes of `p` local parameters of which `trainable`
    (default: all) train (see module doc)."""
    e, d, z = spec.bytes_per_elem, spec.dp, spec.zero
    weights = e * p / (d if z == 3 else 1)
    if z == 3:
        weights += 2 * e * layer_params  # gathered working set: current + prefetched layer
    p = p if trainable is None else trainable  # the optimizer's parameters from here on
    grads = e * p / (d if z >= 2 else 1)
    if z >= 2:
        grads += e * min(REDUCE_BUCKET, p)  # the reduce bucket (contiguous_gradients)
    master = 0.0 if z == 0 else 4 * p / d
    optim = 8 * p / (1 if z == 0 else d)
    if z == 0:
        step = e * min(ZERO0_ALLREDUCE_BUCKET, p)
    elif spec.optimizer == "torch":
        step = 12 * p / d
    else:
        step = (4 + e) * p / d
    return TrainState(weights, grads, master, optim, step)


def frozen_weights(p: int, spec: PlanSpec) -> float:
    """A frozen model's weights (model dtype, replicated over DP)."""
    return spec.bytes_per_elem * p


# ----------------------------------------------------------------------------- activations


def layer_activation_bytes(cfg: ModelConfig, b: int, s: int, tp: int, masked: bool) -> float:
    """Bytes one transformer block saves for backward for a [b, s] micro-batch (module doc)."""
    e = 2 if cfg.dtype == "bf16" else 4
    h, f, t = cfg.hidden_size, cfg.ffn_hidden_size, tp
    kv = cfg.num_kv_heads * cfg.head_dim
    x = b * s * h
    sharded = (h + 2 * kv) / h + 1  # fused qkv output, attention output
    if cfg.family == "llama":
        sharded += (h + kv) / h + 4 * f / h  # RoPE'd q and k; fc1 out, silu, product
        out = 2 * (4 + 2 * e) * x + e * x * sharded / t
    else:
        sharded += 2 * f / h  # GELU input and output
        out = e * x * (4 + sharded / t)
    if masked:
        out += b * s * s * e
    out += 4 * b * (cfg.num_heads / t) * s  # log-sum-exp
    if cfg.lora.enabled:  # each adapter's x A^T [b, s, r], saved for B's gradient
        out += e * b * s * cfg.lora.rank * len(cfg.lora.target_modules)
    return out


def layer_forward_working_set(cfg: ModelConfig, b: int, s: int, tp: int, masked: bool) -> float:
    """Live bytes inside one no-grad block forward: residual, normalized input, the MLP's inner
    tensors (fc1 out plus the activation's output), and the mask bias."""
    e = 2 if cfg.dtype == "bf16" else 4
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    inner = (3 * f if cfg.family == "llama" else 2 * f) / tp
    norm = 4 if cfg.family == "llama" else e  # RMSNorm's fp32 copy
    out = b * s * (2 * e * h + norm * h + e * inner)
    if masked:
        out += b * s * s * (e + 1)  # the bool mask and its float bias
    return out


def head_bytes(cfg: ModelConfig, b: int, s: int, tp: int, backward: bool) -> float:
    """Output head of the last stage: saved normalized input and the logits shard; in backward
    three logits-sized buffers (measured): the logits (the trainer's loss function still holds
    them), the gradient of the response slice the loss reads (`out[:, w - 1 : w + n - 1]`) and
    the full-size gradient the slice's backward scatters it into. Forward only: the logits, and
    masked_fill's second copy while it runs when the vocabulary is padded."""
    e = 2 if cfg.dtype == "bf16" else 4
    h = cfg.hidden_size
    norm = (4 + 2 * e) if cfg.family == "llama" else 2 * e
    out = norm * b * s * h
    if cfg.head == "scalar":
        return out
    vp = padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, tp)
    logits = e * b * s * vp / tp
    copies = 3 if backward else (2 if vp != cfg.vocab_size else 1)
    return out + copies * logits


def activation_bytes(
    cfg: ModelConfig, spec: PlanSpec, b: int, s: int, n_micro: int, first_stage: bool = True
) -> float:
    """Activations a pipeline stage holds at the start of backward (no head): the first stage
    has min(pp, n_micro) micro-batches in flight under 1F1B, the last stage one."""
    layers = math.ceil(cfg.num_layers / spec.pp)
    in_flight = min(spec.pp, n_micro) if first_stage else 1
    masked = spec.padding_mask
    per_layer = layer_activation_bytes(cfg, b, s, spec.tp, masked)
    if not cfg.activation_recompute:
        return in_flight * layers * per_layer
    e = 2 if cfg.dtype == "bf16" else 4
    return in_flight * layers * e * b * s * cfg.hidden_size + per_layer


def kv_cache_bytes(cfg: ModelConfig, b: int, max_len: int, tp: int) -> float:
    """KVCache: 2 * layers * b * kv_heads_local * max_len * head_dim * e, plus key_valid."""
    e = 2 if cfg.dtype == "bf16" else 4
    kv_local = math.ceil(cfg.num_kv_heads / tp)
    return 2 * cfg.num_layers * b * kv_local * max_len * cfg.head_dim * e + b * max_len


# ----------------------------------------------------------------------------- phases


@dataclass
class RoleMemory:
    """One role's bytes on this GPU (0 where it does not apply)."""

    weights: float = 0.0
    grads: float = 0.0
    master: float = 0.0
    optimizer: float = 0.0
    step_transient: float = 0.0
    activations: float = 0.0
    logits: float = 0.0
    kv_cache: float = 0.0
    # Activations + logits buffers of the busiest stage at the start of backward.
    backward_start: float = 0.0
    colocated: bool = True


def trained_role(cfg: ModelConfig, spec: PlanSpec, n_micro: int) -> RoleMemory:
    """State, activations and head of a trained model (actor or critic) on the busiest rank."""
    p, trained = _stage_counts(cfg, spec.tp, spec.pp)
    st = train_state(p, spec, largest_layer_params(cfg, spec.tp), trained)
    b, s = spec.micro_batch, spec.prompt_len + spec.response_len
    acts = activation_bytes(cfg, spec, b, s, n_micro)
    head = head_bytes(cfg, b, s, spec.tp, backward=True)
    start = acts + head
    if spec.pp > 1:  # the head lives on the last stage, the most micro-batches on the first
        start = max(acts, activation_bytes(cfg, spec, b, s, n_micro, first_stage=False) + head)
    m = RoleMemory(st.weights, st.grads, st.master, st.optim, st.step_transient, acts, head)
    m.backward_start = start
    return m


def training_extra(m: RoleMemory) -> float:
    """Peak above the resident state during one optimizer step: the start of backward
    (activations, logits and their gradient) or its end (gradients and the step's transients).
    Backward frees a layer's activations as it allocates its gradients, so the two do not add."""
    return max(m.backward_start, m.grads + m.step_transient)


def train_step_peak(cfg: ModelConfig, spec: PlanSpec, n_micro: int = 1) -> float:
    """Peak bytes of one optimizer step of a single model (SFT-like: weights, optimizer states,
    then `training_extra`), for a [micro_batch, prompt_len + response_len] micro-batch."""
    m = trained_role(cfg, spec, n_micro)
    return m.weights + m.master + m.optimizer + training_extra(m)


def generates_in_place(spec: PlanSpec) -> bool:
    """The hybrid engine generates with the actor's own module (no copy) when the generation
    layout is the training layout: pipeline size 1, tp_g = tp, and no ZeRO-3 partitions."""
    return spec.pp == 1 and spec.generation_tp == spec.tp and spec.zero != 3


def generation_memory(spec: PlanSpec) -> dict[str, float]:
    """The rollout's bytes on one rank: the generation copy of the actor (tp_g, pp 1, model
    dtype; none when generating in place), its KV cache over prompt + response for this rank's
    rows, the prefill working set (one no-grad block; the head runs on the last prompt position
    only), fp32 full-vocabulary sampling buffers, and ZeRO 3's gathered full actor while the
    copy is filled."""
    actor = spec.shape("actor")
    tg = spec.generation_tp
    rows = _rows(spec)[2]
    prefill = layer_forward_working_set(actor, rows, spec.prompt_len, tg, True)
    prefill += head_bytes(actor, rows, 1, tg, backward=False)  # the head runs on the last only
    gather = copy = 0.0
    if spec.zero == 3:
        gather = spec.bytes_per_elem * local_param_count(actor, spec.tp, spec.pp)
    if not generates_in_place(spec):  # the merged model: no adapters
        copy = spec.bytes_per_elem * local_param_count(replace(actor, lora=LoRAConfig()), tg, 1)
    return {
        "copy_weights": copy,
        "kv_cache": kv_cache_bytes(actor, rows, spec.prompt_len + spec.response_len, tg),
        "prefill_working_set": prefill,
        # logits.float(), scaled, log-softmax, probs, cdf: [rows, V] fp32 each.
        "sampling": 5 * 4 * rows * actor.vocab_size,
        "zero3_gather": gather,
        "rows_per_rank": rows,
    }


def rollout_extra(g: dict[str, float]) -> float:
    """Peak of the rollout above the resident state: the copy, then either ZeRO 3's gather (only
    while the copy is filled) or the KV cache with the larger of prefill and sampling."""
    return g["copy_weights"] + max(
        g["zero3_gather"], g["kv_cache"] + max(g["prefill_working_set"], g["sampling"])
    )


@dataclass
class Plan:
    """The planner's answer: per-role memory, per-phase peaks, fit, step time."""

    spec: dict
    params_per_gpu: dict[str, int]
    roles: dict[str, RoleMemory]
    generation: dict[str, float]
    phases: dict[str, float]
    phase_detail: dict[str, dict[str, float]]
    peak: float
    peak_phase: str
    capacity: float
    reserve: float
    fits: bool
    flops: dict[str, float]
    step_time_s: float
    notes: list[str] = field(default_factory=list)
    # Elements per GPU that train (gradients, master, Adam): all of a model's without LoRA.
    trainable_per_gpu: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _resident(role: str, m: RoleMemory, spec: PlanSpec) -> float:
    """Bytes a role keeps on these GPUs between uses (0: elsewhere, or offloaded to CPU)."""
    if not m.colocated or (role in ("reference", "reward") and spec.offload_frozen):
        return 0.0
    return m.weights + m.master + m.optimizer


def experience_peaks(spec: PlanSpec, roles: dict[str, RoleMemory]) -> dict[str, float]:
    """Per colocated role, its forward-only pass over one micro-batch (one no-grad block's
    working set and the head's outputs), plus its weights when it is an offloaded frozen model
    brought to the GPU for the pass."""
    b, s = spec.micro_batch, spec.prompt_len + spec.response_len
    out = {}
    for r, m in roles.items():
        if not m.colocated:
            continue
        cfg = spec.shape(r)
        work = layer_forward_working_set(cfg, b, s, spec.tp, spec.padding_mask)
        work += head_bytes(cfg, b, s, spec.tp, backward=False)
        offloaded = r in ("reference", "reward") and spec.offload_frozen
        out[r] = work + (m.weights if offloaded else 0.0)
    return out


def _rows(spec: PlanSpec) -> tuple[int, int, int]:
    """(rows per training-DP rank, micro-batches per minibatch, rows per generation rank)."""
    rows = spec.rollout_batch * spec.samples_per_prompt
    per_dp = rows // spec.dp
    n_micro = math.ceil(per_dp // spec.num_minibatches / spec.micro_batch)
    gen_dp = spec.world // spec.generation_tp
    return per_dp, n_micro, math.ceil(rows / gen_dp)


def _param_counts(spec: PlanSpec, roles) -> tuple[dict[str, int], dict[str, int]]:
    """Per role: parameter elements per GPU, and (actor, critic) those that train."""
    params = {r: local_param_count(spec.shape(r), spec.tp, spec.pp) for r in roles}
    if spec.lora_rank:  # the reference is the actor with its adapters off: nothing of its own
        params["reference"] = 0
    trainable = {
        r: local_trainable_count(spec.shape(r), spec.tp, spec.pp)
        for r in ("actor", "critic")
        if r in roles
    }
    return params, trainable


def _notes(spec: PlanSpec) -> list[str]:
    notes = []
    missing = [r for r in spec.roles() if r not in spec.colocate]
    if missing:
        notes.append(f"not on these GPUs (planned elsewhere): {', '.join(missing)}")
    if spec.offload_frozen:
        notes.append("frozen models live in CPU memory and count only while in use")
    if spec.lora_rank:
        notes.append(
            f"LoRA r={spec.lora_rank} on {','.join(spec.lora_targets)}: optimizer state for the "
            "adapters (and the critic's head) only; the reference is the actor with its adapters "
            "off (no weights of its own)"
        )
    return notes


def plan(spec: PlanSpec) -> Plan:
    """Per-GPU memory of every role and phase, the fit, and the step time of `spec`."""
    s = spec.prompt_len + spec.response_len
    b = spec.micro_batch
    per_dp, n_micro, gen_rows = _rows(spec)
    here = {r: r in spec.colocate for r in spec.roles()}
    params, trainable = _param_counts(spec, here)
    roles: dict[str, RoleMemory] = {}
    train_peak: dict[str, float] = {}
    for r in ("actor", "critic"):
        if r in here:
            roles[r] = trained_role(spec.shape(r), spec, n_micro)
            roles[r].colocated = here[r]
            if here[r]:
                train_peak[r] = training_extra(roles[r])
    for r in ("reference", "reward"):
        if r in here:
            w = frozen_weights(params[r], spec)
            head = head_bytes(spec.shape(r), b, s, spec.tp, backward=False)
            roles[r] = RoleMemory(weights=w, logits=head, colocated=here[r])
    base = sum(_resident(r, m, spec) for r, m in roles.items())

    generation = generation_memory(spec)
    copy, kv = generation["copy_weights"], generation["kv_cache"]
    roles["actor"].kv_cache = kv
    rollout = base + rollout_extra(generation)

    experience_buffers = 12 * 4 * per_dp * s
    exp_each = experience_peaks(spec, roles)
    experience = base + experience_buffers + max(exp_each.values())

    training = base + experience_buffers + max(train_peak.values())
    phases = {"rollout": rollout, "experience": experience, "training": training}
    detail = {
        "rollout": {"resident": base, "generation_copy": copy, "kv_cache": kv},
        "experience": {"resident": base, "buffers": experience_buffers, **exp_each},
        "training": {"resident": base, "buffers": experience_buffers, **train_peak},
    }
    peak_phase = max(phases, key=phases.get)
    peak = phases[peak_phase]
    reserve = (0.1 * spec.gpu_mem if spec.reserve is None else spec.reserve) * GIB
    capacity = spec.gpu_mem * GIB
    flops = ppo_iteration_flops(
        spec.shape("actor"),
        spec.shape("critic") if spec.critic else None,
        spec.shape("reward") if spec.reward_model else None,
        spec.rollout_batch * spec.samples_per_prompt,
        spec.prompt_len,
        spec.response_len,
        spec.ppo_epochs,
    )
    rate = spec.world * spec.peak_tflops * 1e12
    gen_mfu = spec.gen_mfu or spec.mfu
    step = flops["generate"] / (rate * gen_mfu) + (flops["total"] - flops["generate"]) / (
        rate * spec.mfu
    )
    return Plan(
        spec=_spec_dict(spec),
        params_per_gpu=params,
        roles=roles,
        generation=generation,
        phases=phases,
        phase_detail=detail,
        peak=peak,
        peak_phase=peak_phase,
        capacity=capacity,
        reserve=reserve,
        fits=peak + reserve <= capacity,
        flops=flops,
        step_time_s=step,
        notes=_notes(spec),
        trainable_per_gpu=trainable,
    )


def _spec_dict(spec: PlanSpec) -> dict:
    d = asdict(spec)
    d["colocate"] = list(spec.colocate)
    d["lora_targets"] = list(spec.lora_targets)
    d["world"] = spec.world
    d["gen_tp"] = spec.generation_tp
    return d
