"""Library side of `tools/bench_throughput.py`: peak throughput, peak memory, synthetic prompts,
and the report (latencies, samples/s, tokens/s, achieved TFLOPs and MFU) of measured steps.

FLOPs come from `megarlhf.perf.flops` (the Megatron formula with attention and vocabulary terms);
this module only divides them by measured times. Simplifications, stated: every timing is this
rank's wall clock (the ranks of one step wait for each other in collectives, so they agree to
within the last collective), and the report averages the measured iterations (mean, not median,
so that samples/s is exactly batch / mean latency).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from megarlhf.utils.rss import peak_rss_bytes

# Dense peak TFLOPs of accelerators from their vendors' data sheets (no sparsity), by dtype.
# fp32 is the plain (non-tensor-core) rate; our fp32 matmuls may run as TF32 only if the user
# enables it, so fp32 runs are stated against the fp32 figure.
CUDA_PEAK_TFLOPS = {
    "H100": {"bf16": 989.0, "fp32": 67.0},  # H100 SXM5
    "H200": {"bf16": 989.0, "fp32": 67.0},  # same compute as H100 SXM5
    "A100": {"bf16": 312.0, "fp32": 19.5},
    "A10G": {"bf16": 125.0, "fp32": 31.2},
    "L4": {"bf16": 121.0, "fp32": 30.3},
}

# Stage name of the report -> (timing key of PPOTrainer.train_step, FLOPs key of
# `ppo_iteration_flops` or None when the stage does no counted matmuls).
PPO_STAGES = {
    "generate": ("time_generate", "generate"),
    "reshard": ("time_reshard", None),
    "actor_forward": ("time_actor_forward", "actor_forward"),
    "reference_forward": ("time_reference_forward", "reference_forward"),
    "critic_forward": ("time_values", "critic_forward"),
    "reward_forward": ("time_reward", "reward_forward"),
    "advantages": ("time_advantages", None),
    "actor_update": ("time_update_actor", "actor_update"),
    "critic_update": ("time_update_critic", "critic_update"),
}


def cuda_peak_tflops(device_name: str, dtype: str) -> float | None:
    """Table peak of a CUDA device whose name contains a key of CUDA_PEAK_TFLOPS, else None."""
    for key, by_dtype in CUDA_PEAK_TFLOPS.items():
        if key in device_name:
            return by_dtype[dtype]
    return None


def measure_matmul_tflops(
    n: int = 2048, reps: int = 5, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> float:
    """Best achieved TFLOPs of an [n, n] @ [n, n] torch.matmul (2 n^3 FLOPs) over `reps` runs:
    the machine's practical peak, used as the MFU denominator when no table value applies."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    torch.matmul(a, b)  # warm-up: thread pool, allocator
    best = float("inf")
    for _ in range(reps):
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.matmul(a, b)
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best / 1e12


def fast_bf16_device() -> bool:
    """Whether this machine's matmuls run bf16 faster than fp32: a CUDA device with bf16, or a
    CPU with AMX-BF16 or AVX512-BF16 (oneDNN's bf16 kernels; measured 4-8x fp32 there)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("amx_bf16", "avx512_bf16"))


def measured_peak(dtype: str, device: str = "cpu", n: int = 2048) -> tuple[float, str]:
    """(peak TFLOPs of an [n, n] matmul in `dtype` here, what it is): the MFU denominator in the
    run's own dtype."""
    tdtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    tflops = measure_matmul_tflops(n, dtype=tdtype, device=device)
    where = "this CPU" if device == "cpu" else torch.cuda.get_device_name()
    return tflops, f"measured {dtype} torch.matmul {n}^3 on {where} (best of 5)"


def phase_mfu(records: list[dict], flops: dict, world: int, peak: float) -> dict:
    """MFU of the training phase (actor and critic updates) and of the generation phase, each its
    FLOPs over its own measured time."""

    def mfu(time_keys, flops_keys):
        t = mean([sum(r[k] for k in time_keys) for r in records])
        f = sum(flops[k] for k in flops_keys)
        return f / t / world / 1e12 / peak if t > 0 else 0.0

    return {
        "train_mfu": mfu(("time_update_actor", "time_update_critic"),
                         ("actor_update", "critic_update")),
        "generate_mfu": mfu(("time_generate",), ("generate",)),
    }  # fmt: skip


def peak_memory_bytes() -> tuple[int, str]:
    """(peak bytes of this process, what was measured).

    CUDA: torch.cuda.max_memory_allocated (tensors only). CPU: the peak resident set size of the
    process (`megarlhf.utils.rss`: VmHWM on Linux), which includes the Python interpreter, torch's
    code and every library, not only tensors.
    """
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated()), "cuda_max_memory_allocated"
    return peak_rss_bytes(), "cpu_peak_rss"


def synthetic_prompts(n: int, length: int, vocab: int, seed: int, low: int = 4) -> list[list[int]]:
    """n prompts of exactly `length` uniform random token ids in [low, vocab) (ids below `low`
    are left out: the tokenizers' special ids, pad and EOS among them)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, vocab, (n, length), generator=g).tolist()


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def throughput_fields(
    latency_s: float,
    batch: int,
    tokens_per_iteration: int,
    flops_per_iteration: float,
    world_size: int,
    peak_tflops: float,
) -> dict:
    """samples/s, tokens/s (total and per device), achieved TFLOPs per device and MFU of one
    iteration of `latency_s` seconds (every device works on the iteration for all of it)."""
    tflops = flops_per_iteration / latency_s / world_size / 1e12
    tokens_per_s = tokens_per_iteration / latency_s
    return {
        "e2e_latency_s": latency_s,
        "samples_per_s": batch / latency_s,
        "tokens_per_iteration": tokens_per_iteration,
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_device": tokens_per_s / world_size,
        "flops_per_iteration": flops_per_iteration,
        "tflops_per_device": tflops,
        "mfu": tflops / peak_tflops,
    }


def ppo_report(
    records: list[dict],
    flops: dict[str, float],
    batch: int,
    prompt_len: int,
    response_len: int,
    world_size: int,
    peak_tflops: float,
) -> dict:
    """Report of measured PPO iterations.

    Args:
        records: PPOTrainer.train_step() records of the measured iterations.
        flops: `ppo_iteration_flops` of one iteration (by stage, and "total").
        batch: samples per iteration over all ranks.
        prompt_len, response_len: tokens per sample (every response has exactly response_len).
        world_size: devices (ranks) sharing the iteration.
        peak_tflops: per-device peak, the MFU denominator.
    Returns:
        e2e fields (`throughput_fields`; tokens = batch x (prompt + response)),
        generated_tokens_per_s, per-iteration latencies, and `stages`: per stage its mean latency
        and, for stages with counted FLOPs, FLOPs and achieved TFLOPs per device; generate also
        gives its per-token latency (latency / response_len).
    """
    latencies = [r["step_time_s"] for r in records]
    e2e = mean(latencies)
    out = throughput_fields(
        e2e, batch, batch * (prompt_len + response_len), flops["total"], world_size, peak_tflops
    )
    out["generated_tokens_per_s"] = batch * response_len / e2e
    out["iteration_latencies_s"] = latencies
    stages = {}
    for name, (time_key, flops_key) in PPO_STAGES.items():
        t = mean([r[time_key] for r in records])
        st = {"latency_s": t}
        if flops_key is not None:
            st["flops"] = flops[flops_key]
            st["tflops_per_device"] = flops[flops_key] / t / world_size / 1e12 if t > 0 else 0.0
        stages[name] = st
    stages["generate"]["per_token_latency_ms"] = (
        1e3 * stages["generate"]["latency_s"] / (response_len)
    )
    out["stages"] = stages
    return out


# ----------------------------------------------------------------------------- other libraries


def hf_config_of(cfg, pad_id: int, eos_id: int):
    """A transformers config of the same architecture and dims as our ModelConfig `cfg` (through
    the converter's table, so the shapes are the ones `megarlhf_to_hf` writes), fp32."""
    from transformers import AutoConfig

    from megarlhf.convert.hf_config import model_config_to_hf_config

    d = model_config_to_hf_config(cfg)
    d.pop("architectures", None)
    d["dtype"] = "float32"
    d.update(pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=eos_id, num_labels=1)
    return AutoConfig.for_model(d.pop("model_type"), **d)


def to_hf_causal_lm(model, workdir: str | Path, dtype: torch.dtype = torch.float32):
    """The transformers causal LM holding exactly the weights of our single-rank GPTModel `model`
    (saved as a megarlhf checkpoint, converted by `megarlhf_to_hf`, loaded by from_pretrained in
    `dtype`)."""
    from transformers import AutoModelForCausalLM

    from megarlhf.checkpoint.model_shards import save_model_shard
    from megarlhf.convert import megarlhf_to_hf

    ckpt, out = Path(workdir) / "ckpt", Path(workdir) / "hf"
    save_model_shard(ckpt, model.state_dict(), model.cfg, tp=1, tp_rank=0, pp=1, pp_rank=0)
    megarlhf_to_hf(ckpt, out, overwrite=True)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=dtype)
    return hf.eval()
