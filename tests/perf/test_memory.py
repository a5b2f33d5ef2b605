"""The memory model: hand-computed unit cases, and predictions against MEASURED peak memory.

Measurements run in a fresh process (this file is also that process's script) on CPU: peak RSS
(VmHWM, `megarlhf.utils.rss`; not ru_maxrss, which Linux carries over from the pytest process
across fork + exec) minus the RSS after imports and after a warm-up of the same code path on a
tiny model. The warm-up pays DeepSpeed's fixed costs (its shared-memory op, accelerator setup:
about 155 MB, a framework reserve on a GPU) so that what remains is model memory. glibc's
`MALLOC_MMAP_THRESHOLD_` is pinned at 64 KiB so every tensor is its own mapping, returned to the
system when freed: RSS then follows the live tensors instead of the allocator's high-water mark.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from megarlhf.config import ModelConfig
from megarlhf.config.model import LoRAConfig
from megarlhf.perf.memory import (
    PlanError,
    PlanSpec,
    generation_memory,
    kv_cache_bytes,
    layer_activation_bytes,
    local_param_count,
    local_trainable_count,
    plan,
    rollout_extra,
    train_state,
    train_step_peak,
    trained_role,
)
from megarlhf.utils.rss import peak_rss_bytes, rss_bytes

ROOT = Path(__file__).resolve().parents[2]
TOL = 0.20

# ----------------------------------------------------------------------------- hand counts

# gpt2, h=64, 2 layers, 4 heads, vocab 256 (a multiple of 128: no padding at tp 1 or 2),
# max_seq_len 32, tied embeddings.
TINY = ModelConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, max_seq_len=32)
# Per layer: norms 2 * 2h, qkv 3h^2 + 3h, proj h^2 + h, fc1 4h^2 + 4h, fc2 4h^2 + h.
LAYER = 4 * 64 + 12 * 64 * 64 + 9 * 64
EMB = 256 * 64 + 32 * 64  # word + positions
TOTAL = 2 * LAYER + EMB + 2 * 64  # + final norm


def spec(**kw) -> PlanSpec:
    base = dict(model=TINY, nodes=1, gpus_per_node=1, dp=1, prompt_len=8, response_len=8)
    base.update(kw)
    return PlanSpec(**base)


def test_param_counts_by_hand():
    assert local_param_count(TINY, 1, 1) == TOTAL
    # TP 2 halves the matrices and the column-parallel biases; norms, row biases, positions stay.
    half = 4 * 64 + 6 * 64 * 64 + (3 * 64 // 2 + 64 + 4 * 64 // 2 + 64)
    assert local_param_count(TINY, 2, 1) == 2 * half + 128 * 64 + 32 * 64 + 2 * 64
    # PP 2: stage 0 has the embeddings and layer 0; the last stage a tied copy of the word
    # embedding, layer 1 and the final norm: the busier one is stage 0.
    assert local_param_count(TINY, 1, 2) == LAYER + EMB


def test_training_state_bytes_by_hand():
    p = 1000
    # bf16, ZeRO 1 over 4: weights 2, grads 2 full; master 4 + Adam 8 over 4.
    st = train_state(p, spec(zero=1, dtype="bf16", gpus_per_node=4, dp=4), 0)
    assert (st.weights, st.grads, st.master, st.optim) == (2000, 2000, 1000, 2000)
    # ZeRO 3 divides the weights too (plus two gathered layers of 100), ZeRO 2 the grads
    # (plus the reduce bucket, here the whole 1000).
    st = train_state(p, spec(zero=3, dtype="bf16", gpus_per_node=4, dp=4), 100)
    assert st.weights == 2000 / 4 + 2 * 2 * 100
    assert st.grads == 2000 / 4 + 2000
    # The mixed-precision rule: 16 bytes per parameter at dp 1 (ZeRO 1, fused Adam).
    st = train_state(p, spec(zero=1, dtype="bf16"), 0)
    assert st.weights + st.grads + st.master + st.optim == 16 * p
    # fp32 at ZeRO 0: 4 + 4 + 8 = 16; at ZeRO 1 DeepSpeed adds its own fp32 copy: 20.
    st0 = train_state(p, spec(zero=0, dtype="fp32"), 0)
    st1 = train_state(p, spec(zero=1, dtype="fp32"), 0)
    assert st0.weights + st0.grads + st0.optim == 16 * p and st0.master == 0
    assert st1.weights + st1.grads + st1.master + st1.optim == 20 * p


def test_activation_and_cache_bytes_by_hand():
    c = dataclasses.replace(TINY, dtype="bf16")
    b, s, h = 2, 16, 64
    x = b * s * h
    # gpt2 bf16 at tp 1: 2 bytes * x * (4 replicated + 3 qkv + 1 attention out + 8 MLP),
    # + the padding mask's bias b s^2 * 2, + fp32 log-sum-exp b a s * 4.
    want = 2 * x * 16 + 2 * b * s * s + 4 * b * 4 * s
    assert layer_activation_bytes(c, b, s, 1, masked=True) == want
    # TP 2 halves the 12 sharded units and the log-sum-exp, not the 4 replicated nor the mask.
    want2 = 2 * x * (4 + 6) + 2 * b * s * s + 4 * b * 2 * s
    assert layer_activation_bytes(c, b, s, 2, masked=True) == want2
    # KV cache: 2 (k, v) * layers * b * heads * len * head_dim * 2 bytes + the valid mask.
    assert kv_cache_bytes(c, 3, 16, 1) == 2 * 2 * 3 * 4 * 16 * 16 * 2 + 3 * 16
    assert kv_cache_bytes(c, 3, 16, 2) == 2 * 2 * 3 * 2 * 16 * 16 * 2 + 3 * 16


def test_pipeline_stages_activations_and_head():
    # 4 layers over pp 2 with 4 micro-batches: the first stage holds 2 micro-batches of its 2
    # layers (1F1B), the last stage 1 micro-batch of 2 layers plus the head.
    c = dataclasses.replace(TINY, num_layers=4, vocab_size=4096)
    sp = spec(model=c, gpus_per_node=2, pp=2, dp=1, micro_batch=1, rollout_batch=4, recompute=False)
    layer = layer_activation_bytes(sp.shape("actor"), 1, 16, 1, masked=True)
    m = trained_role(sp.shape("actor"), sp, n_micro=4)
    assert m.activations == 2 * 2 * layer
    assert m.backward_start == max(4 * layer, 2 * layer + m.logits)
    # bf16 logits [1, 16, 4096], three of them in backward, + two saved [1, 16, 64] norm tensors.
    assert m.logits == 3 * 2 * 16 * 4096 + 2 * 2 * 16 * 64


def test_plan_phases_and_fit():
    p = plan(spec(zero=1, dtype="bf16", gpu_mem=1.0))
    assert set(p.phases) == {"rollout", "experience", "training"}
    assert p.peak == max(p.phases.values()) and p.fits
    # The generation copy and the KV cache sit on top of the resident training state.
    res = p.phase_detail["rollout"]["resident"]
    assert p.phases["rollout"] > res + p.generation["copy_weights"] + p.generation["kv_cache"]
    # Offloading frozen models lowers the resident state by the reference + reward weights.
    off = plan(spec(zero=1, dtype="bf16", gpu_mem=1.0, offload_frozen=True))
    drop = p.roles["reference"].weights + p.roles["reward"].weights
    assert p.phase_detail["rollout"]["resident"] - off.phase_detail["rollout"]["resident"] == drop
    # A model not colocated does not count here.
    alone = plan(spec(zero=1, dtype="bf16", colocate=("actor", "critic")))
    assert alone.phase_detail["rollout"]["resident"] == res - drop
    # A critic on other GPUs neither trains nor sits here.
    no_critic = plan(spec(zero=1, dtype="bf16", colocate=("actor", "reference", "reward")))
    assert "critic" not in no_critic.phase_detail["training"]
    assert "critic" not in no_critic.phase_detail["experience"]
    critic = p.roles["critic"]
    moved = critic.weights + critic.master + critic.optimizer
    assert no_critic.phase_detail["training"]["resident"] == res - moved
    # Same generation and training layout: the actor generates in place (no copy); another
    # generation TP, or ZeRO 3 partitions, need a copy (at tp_g = 1: the whole model).
    assert p.generation["copy_weights"] == 0
    two = dict(gpus_per_node=2, dp=2, zero=1, dtype="bf16")
    assert plan(spec(**two)).generation["copy_weights"] == 0
    copy = plan(spec(**{**two, "dp": 1, "tp": 2, "gen_tp": 1})).generation["copy_weights"]
    assert copy == 2 * TOTAL
    z3 = plan(spec(**{**two, "zero": 3})).generation
    assert z3["copy_weights"] == 2 * TOTAL and z3["zero3_gather"] == 2 * TOTAL
    # Too little memory: does not fit.
    assert not plan(spec(zero=1, dtype="bf16", gpu_mem=0.001, reserve=0.0)).fits


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(dp=3), "dp"),
        (dict(zero=4), "zero"),
        (dict(zero=0, dtype="bf16"), "zero"),
        (dict(colocate=("critic",)), "colocate"),
        (dict(colocate=("actor", "judge")), "colocate"),
        (dict(response_len=100), "response_len"),
        (dict(gen_tp=3, gpus_per_node=2, dp=2), "gen_tp"),
        (dict(mfu=1.5), "mfu"),
    ],
)
def test_bad_specs_name_the_field(kw, field):
    with pytest.raises(PlanError) as e:
        spec(**kw)
    assert e.value.field == field


# ----------------------------------------------------------------------------- LoRA

# Rank 4 on every linear of a TINY layer: r * (in + out) per adapter, qkv 4 (64 + 192) = 1024,
# proj 4 (64 + 64) = 512, fc1 4 (64 + 256) = 1280, fc2 4 (256 + 64) = 1280.
LORA_LAYER = 1024 + 512 + 1280 + 1280
HEAD = 64 + 1  # the critic's scalar head: weight [1, h], bias [1]


def test_lora_counts_by_hand():
    sp = spec(lora_rank=4)
    actor, critic = sp.shape("actor"), sp.shape("critic")
    assert local_param_count(actor, 1, 1) == TOTAL + 2 * LORA_LAYER
    assert local_trainable_count(actor, 1, 1) == 2 * LORA_LAYER
    assert local_trainable_count(critic, 1, 1) == 2 * LORA_LAYER + HEAD
    assert not sp.shape("reference").lora.enabled and not sp.shape("reward").lora.enabled
    # TP 2: a column-parallel W keeps A whole and splits B (qkv 256 + 384, fc1 256 + 512), a
    # row-parallel W splits A and keeps B (proj 128 + 256, fc2 512 + 256).
    assert local_trainable_count(actor, 2, 1) == 2 * (640 + 768 + 384 + 768)
    # Only some targets: qkv and proj.
    assert local_trainable_count(spec(lora_rank=4, lora_targets=("qkv", "proj")).shape("actor"),
                                 1, 1) == 2 * (1024 + 512)  # fmt: skip
    # PP 2: stage 0 (embeddings, layer 0) is the busier one, with layer 0's adapters.
    assert local_trainable_count(actor, 1, 2) == LORA_LAYER
    # Without LoRA everything trains.
    assert local_trainable_count(TINY, 1, 1) == TOTAL


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_lora_counts_equal_a_built_model(family):
    """Against the real thing: the parameters a GPTModel with adapters builds, and trains."""
    from megarlhf.model.gpt import GPTModel
    from megarlhf.parallel.state import single_process_state
    from tests.model.common import tiny_config

    for head, targets in (("lm", ("qkv", "fc2")), ("scalar", ("proj", "fc1", "fc2"))):
        base = tiny_config(family, head=head)
        sp = spec(model=base, lora_rank=3, lora_targets=targets)
        cfg = sp.shape("critic" if head == "scalar" else "actor")
        model = GPTModel(cfg, single_process_state(), seed=0)
        params = list(model.parameters())
        assert local_param_count(cfg, 1, 1) == sum(p.numel() for p in params)
        assert local_trainable_count(cfg, 1, 1) == sum(p.numel() for p in params if p.requires_grad)


def test_lora_training_state_by_hand():
    # bf16, ZeRO 1 over 2: every weight (base + adapters) 2 bytes, replicated; gradients 2 bytes,
    # fp32 master 4 and Adam 8 (over DP) and the fused step's 4 + 2 for the adapters alone.
    sp = spec(lora_rank=4, zero=1, dtype="bf16", gpus_per_node=2, dp=2, rollout_batch=2)
    p, t = TOTAL + 2 * LORA_LAYER, 2 * LORA_LAYER
    m = trained_role(sp.shape("actor"), sp, n_micro=1)
    assert (m.weights, m.grads, m.master, m.optimizer) == (2 * p, 2 * t, 4 * t / 2, 8 * t / 2)
    assert m.step_transient == 6 * t / 2
    full = trained_role(spec(zero=1, dtype="bf16", gpus_per_node=2, dp=2, rollout_batch=2)
                        .shape("actor"), sp, n_micro=1)  # fmt: skip
    assert full.master + full.optimizer == 12 * TOTAL / 2
    # Each adapter saves its [b, s, r] product: 4 adapters x 2 bytes x b s r more per layer.
    b, s = 2, 16
    plain = layer_activation_bytes(dataclasses.replace(TINY, dtype="bf16"), b, s, 1, True)
    adapted = layer_activation_bytes(sp.shape("actor"), b, s, 1, True)
    assert adapted - plain == 4 * 2 * b * s * 4


def test_lora_plan_drops_the_reference_and_most_optimizer_state():
    kw = dict(zero=1, dtype="bf16", gpu_mem=1.0)
    full, lora = plan(spec(**kw)), plan(spec(**kw, lora_rank=4))
    assert lora.params_per_gpu["reference"] == 0 and lora.roles["reference"].weights == 0
    assert full.roles["reference"].weights == 2 * TOTAL
    critic = local_param_count(spec().shape("critic"), 1, 1)  # the critic / reward trunk + head
    assert lora.trainable_per_gpu == {"actor": 2 * LORA_LAYER, "critic": 2 * LORA_LAYER + HEAD}
    assert full.trainable_per_gpu == {"actor": TOTAL, "critic": critic}
    # Resident: actor and critic weights (with adapters) + 12 B per trained element, no
    # reference, the reward model's bf16 weights.
    t_a, t_c = 2 * LORA_LAYER, 2 * LORA_LAYER + HEAD
    want = 2 * (TOTAL + t_a) + 12 * t_a + 2 * (critic + 2 * LORA_LAYER) + 12 * t_c + 2 * critic
    assert lora.phase_detail["training"]["resident"] == want
    want_full = 2 * TOTAL + 12 * TOTAL + 2 * critic + 12 * critic + 2 * TOTAL + 2 * critic
    assert full.phase_detail["training"]["resident"] == want_full
    assert lora.peak < full.peak and any("LoRA r=4" in n for n in lora.notes)
    # Generating at another TP, the copy is the merged model: the base alone.
    two = dict(gpus_per_node=2, dp=1, tp=2, gen_tp=1, zero=1, dtype="bf16")
    assert plan(spec(**two, lora_rank=4)).generation["copy_weights"] == 2 * TOTAL
    # model.lora given with the model is the same plan as --lora-rank.
    with_model = spec(model=dataclasses.replace(TINY, lora=LoRAConfig(rank=4)), **kw)
    assert plan(with_model).phases == lora.phases


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(lora_rank=-1), "lora_rank"),
        (dict(lora_rank=4, lora_targets=("qkv", "lm_head")), "lora_targets"),
        (dict(lora_rank=4, lora_targets=()), "lora_targets"),
        (dict(lora_rank=4, zero=3, gpus_per_node=2, dp=2), "zero"),
    ],
)
def test_bad_lora_specs_name_the_field(kw, field):
    with pytest.raises(PlanError) as e:
        spec(**kw)
    assert e.value.field == field


# ----------------------------------------------------------------------------- measurement

MEASURE_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "65536",
    "OMP_NUM_THREADS": "1",
    "LOCAL_RANK": "0",
    "PYTHONPATH": str(ROOT),
    "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions")),
}

# Training-step cases: (family, hidden, layers, heads, vocab, batch, seq, zero stage, dtype).
# gpt2 fp32 at ZeRO 0: activations and logits dominate; llama fp32 at ZeRO 1: the optimizer step;
# bf16 at ZeRO 1 (small batch: bf16 matmuls are slow on CPU): the mixed-precision 16-byte rule.
TRAIN_CASES = {
    "gpt2_zero0": ("gpt2", 512, 4, 8, 8192, 4, 256, 0, "fp32"),
    "llama_zero1": ("llama", 512, 4, 8, 8192, 2, 256, 1, "fp32"),
    "gpt2_bf16_zero1": ("gpt2", 512, 4, 8, 8192, 1, 32, 1, "bf16"),
}
# PPO: actor / critic / reference of this shape, rule reward, fp32, ZeRO 1, one process.
PPO_MODEL = dict(hidden_size=512, num_layers=4, num_heads=8, vocab_size=16384, max_seq_len=96)
PPO_RUN = dict(rollout=16, micro=8, prompt=40, response=24)


# Rollout alone on 2 ranks: actor trained at TP 2, generation at TP 1 (so each rank builds a
# full generation copy and generates half the rows): rows, prompt, response.
ROLLOUT_RUN = dict(rows=32, prompt=64, response=128)
MEASUREMENTS = [("train", name) for name in sorted(TRAIN_CASES)]
MEASUREMENTS += [("ppo", "default"), ("rollout", "0"), ("rollout", "1")]


@pytest.fixture(scope="module")
def measured() -> dict:
    """Every measurement, each in its own fresh process, all started at once (peak RSS is per
    process, so running them side by side changes no number, only the wall time)."""
    env = dict(os.environ, **MEASURE_ENV)
    env["MEGARLHF_MEM_INIT"] = tempfile.mktemp(prefix="megarlhf_mem_")  # the 2-rank world
    procs = {
        key: subprocess.Popen(
            [sys.executable, __file__, *key],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for key in MEASUREMENTS
    }
    out = {}
    for key, proc in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for p in procs.values():
                p.kill()
            raise
        assert proc.returncode == 0, f"{key}: {stderr[-4000:]}"
        out[key] = json.loads(stdout.strip().splitlines()[-1])
    return out


def _train_model(name: str) -> ModelConfig:
    fam, h, layers, heads, vocab, _, seq, _, dtype = TRAIN_CASES[name]
    return ModelConfig(
        family=fam, vocab_size=vocab, hidden_size=h, num_layers=layers, num_heads=heads,
        max_seq_len=seq, tie_embeddings=False, dtype=dtype,
    )  # fmt: skip


def predict_train(name: str) -> float:
    _, _, _, _, _, b, seq, zero, dtype = TRAIN_CASES[name]
    sp = PlanSpec(
        model=_train_model(name), nodes=1, gpus_per_node=1, dp=1, zero=zero, dtype=dtype,
        recompute=False, micro_batch=b, prompt_len=seq // 2, response_len=seq - seq // 2,
        rollout_batch=b, optimizer="torch",
    )  # fmt: skip
    return train_step_peak(sp.shape("actor"), sp)


def ppo_spec() -> PlanSpec:
    r = PPO_RUN
    return PlanSpec(
        model=ModelConfig(family="gpt2", tie_embeddings=True, **PPO_MODEL), nodes=1,
        gpus_per_node=1, dp=1, zero=1, dtype="fp32", recompute=False, micro_batch=r["micro"],
        prompt_len=r["prompt"], response_len=r["response"], rollout_batch=r["rollout"],
        colocate=("actor", "critic", "reference"), reward_model=False, optimizer="torch",
    )  # fmt: skip


def rollout_spec() -> PlanSpec:
    r = ROLLOUT_RUN
    model = ModelConfig(family="gpt2", tie_embeddings=True, **{**PPO_MODEL, "max_seq_len": 192})
    return PlanSpec(
        model=model, nodes=1, gpus_per_node=2, tp=2, dp=1, gen_tp=1, zero=1, dtype="fp32",
        prompt_len=r["prompt"], response_len=r["response"], rollout_batch=r["rows"],
    )  # fmt: skip


def predict_rollout() -> float:
    """The actor's TP-2 shard (a plain model here) plus the rollout's peak above it."""
    sp = rollout_spec()
    actor = 4 * local_param_count(sp.shape("actor"), 2, 1)
    return actor + rollout_extra(generation_memory(sp))


def _check(pred: float, measured: float) -> None:
    err = (pred - measured) / measured
    print(f"predicted {pred / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB, {err:+.1%}")
    assert abs(err) <= TOL, f"prediction off by {err:+.1%}"


@pytest.mark.parametrize("name", sorted(TRAIN_CASES))
def test_train_step_peak_matches_measurement(name, measured):
    _check(predict_train(name), measured[("train", name)]["peak"])


def test_ppo_step_peak_matches_measurement(measured):
    _check(plan(ppo_spec()).peak, measured[("ppo", "default")]["peak"])


@pytest.mark.parametrize("rank", ["0", "1"])
def test_rollout_peak_matches_measurement(measured, rank):
    _check(predict_rollout(), measured[("rollout", rank)]["peak"])


# ----------------------------------------------------------------------------- the subprocess


def _rss() -> int:
    return rss_bytes()


def _peak_rss() -> int:
    # Not ru_maxrss: Linux carries it over fork + exec, so this process would report the size
    # of the pytest process that started it (megarlhf/utils/rss.py).
    return peak_rss_bytes()


def _init_world(rank: int = 0, world: int = 1):
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    init = (
        tempfile.mktemp(prefix="megarlhf_mem_") if world == 1 else os.environ["MEGARLHF_MEM_INIT"]
    )
    dist.init_process_group(
        "gloo", init_method=f"file://{init}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=240),
    )  # fmt: skip


def _train_steps(cfg: ModelConfig, zero: int, b: int, s: int, steps: int) -> None:
    import torch
    from megarlhf.kernels import logprobs_from_logits

    from megarlhf.config.optim import DeepSpeedConfig, OptimConfig
    from megarlhf.model.gpt import GPTModel
    from megarlhf.optim.deepspeed_model import DeepSpeedModel
    from megarlhf.parallel.state import build_parallel_state

    ps = build_parallel_state(1, 1)
    engine = DeepSpeedModel(
        GPTModel(cfg, ps, seed=1), ps, optim=OptimConfig(impl="torch"),
        deepspeed=DeepSpeedConfig(zero_stage=zero), micro_batch_size=b, grad_accum=1,
        total_steps=10,
    )  # fmt: skip
    ids = torch.randint(0, cfg.vocab_size, (b, s), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(b, s, dtype=torch.long)
    mask[0, : s // 4] = 0  # left padding, as PPO batches have
    for _ in range(steps):
        engine.begin_step(1)
        out = engine(ids, attention_mask=mask)
        loss = -logprobs_from_logits(out[:, :-1], ids[:, 1:]).mean()
        engine.backward(loss)
        del out, loss  # as in the trainers: the schedule drops its outputs before the step
        engine.step()


def _worker_train(name: str) -> dict:
    import gc

    _init_world()
    fam, _, _, _, _, b, seq, zero, dtype = TRAIN_CASES[name]
    warm = ModelConfig(
        family=fam, vocab_size=256, hidden_size=64, num_layers=1, num_heads=1, dtype=dtype
    )
    _train_steps(warm, zero, 1, 16, 2)
    gc.collect()
    base = _rss()
    # ZeRO 0's torch AdamW creates its states in the first step, so the steady state is the
    # second; at ZeRO 1 the first step already peaks as high (its new Adam m, v take the place of
    # the later steps' partition-sized temporaries: 8 bytes per parameter either way).
    _train_steps(_train_model(name), zero, b, seq, 2 if zero == 0 else 1)
    return {"peak": _peak_rss() - base}


def _ppo_trainer(model: dict, rollout: int, micro: int, prompt: int, response: int, out: str):
    from megarlhf.config import load_config
    from megarlhf.config.ppo import PPORunConfig
    from megarlhf.parallel.state import build_parallel_state
    from megarlhf.trainers.ppo import PPOTrainer

    overrides = [f"model.{k}={v}" for k, v in model.items()] + [
        "model.tie_embeddings=true",
        f"ppo.rollout_batch_size={rollout}",
        f"ppo.micro_batch_size={micro}",
        "ppo.num_minibatches=1",
        "ppo.ptx_coef=0",
        f"generation.max_new_tokens={response}",
        f"data.max_prompt_len={prompt}",
        "deepspeed.zero_stage=1",
        "optim.impl=torch",
        "critic_optim.impl=torch",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
    ]
    cfg = load_config(PPORunConfig, ROOT / "configs" / "ppo_tiny.yaml", overrides)
    prompts = [[3 + (7 * i + j) % 200 for j in range(prompt)] for i in range(rollout)]
    trainer = PPOTrainer(
        cfg, build_parallel_state(1, 1), out, reward_fn=lambda p, r: [float(len(x)) for x in r],
        prompts=prompts, stop_at_eos=False,
    )  # fmt: skip
    trainer.setup()
    return trainer


def _worker_ppo(_: str) -> dict:
    import gc
    import tempfile

    _init_world()
    tmp = tempfile.mkdtemp()
    warm = _ppo_trainer(dict(hidden_size=64, num_layers=1, num_heads=1), 2, 2, 4, 2, tmp)
    warm.train_step()
    del warm
    gc.collect()
    base = _rss()
    trainer = _ppo_trainer(
        PPO_MODEL, PPO_RUN["rollout"], PPO_RUN["micro"], PPO_RUN["prompt"], PPO_RUN["response"],
        tmp,
    )  # fmt: skip
    for _ in range(2):
        trainer.train_step()
    return {"peak": _peak_rss() - base}


def _rollout(model: dict, rows: int, prompt: int, response: int) -> None:
    from megarlhf.config import GenerationConfig
    from megarlhf.engine.hybrid import HybridEngine
    from megarlhf.model.gpt import GPTModel
    from megarlhf.parallel.state import build_parallel_state

    train_ps, gen_ps = build_parallel_state(2, 1), build_parallel_state(1, 1)
    actor = GPTModel(ModelConfig(family="gpt2", dtype="fp32", **model), train_ps, seed=1)
    gen = GenerationConfig(max_new_tokens=response, seed=3)
    hybrid = HybridEngine(actor, gen_ps, gen, eos_id=None, pad_id=0)
    prompts = [[3 + (5 * i + j) % 200 for j in range(prompt)] for i in range(rows)]
    hybrid.rollout(prompts, step=0)


def _worker_rollout(rank: str) -> dict:
    import gc

    _init_world(int(rank), 2)
    _rollout(dict(hidden_size=64, num_layers=1, num_heads=2, vocab_size=256), 2, 4, 2)
    gc.collect()
    base = _rss()
    r = ROLLOUT_RUN
    _rollout({**PPO_MODEL, "max_seq_len": 192}, r["rows"], r["prompt"], r["response"])
    return {"peak": _peak_rss() - base}


if __name__ == "__main__":
    kind, case = sys.argv[1], sys.argv[2]
    workers = {"train": _worker_train, "ppo": _worker_ppo, "rollout": _worker_rollout}
    result = workers[kind](case)
    print(json.dumps(result))
