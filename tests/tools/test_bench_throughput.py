"""tools/bench_throughput.py at a tiny size, as a subprocess with --json: every field is there and
agrees with values computed here by hand from the JSON's own inputs (FLOPs from the Megatron
formula written out again below, not through megarlhf.perf.flops)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megarlhf.perf.bench import fast_bf16_device

ROOT = Path(__file__).parents[2]
TOOL = ROOT / "tools" / "bench_throughput.py"
# tiny_gpt2: h 64, 2 layers, vocab 512, ffn 4h, tied embeddings.
H, L, V = 64, 2, 512
SHAPE = ["--model", "tiny_gpt2", "--batch", "4", "--prompt-len", "8", "--response-len", "6"]
B, P, N = 4, 8, 6


def run_tool(tmp_path, *args, launcher=(sys.executable,), timeout=240) -> dict:
    out = tmp_path / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("RANK", None)
    proc = subprocess.run(
        [*launcher, str(TOOL), *args, "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def fwd(b, s, head_tokens, head_width):
    """GPT-2 block forward FLOPs by hand: 24 B s h^2 + 4 B s^2 h per layer, 2 B t h W head."""
    return L * (24 * b * s * H * H + 4 * b * s * s * H) + 2 * b * head_tokens * H * head_width


def gen_flops(b, p, n):
    total = fwd(b, p, 1, V)
    for t in range(1, n):  # each new token attends to p + t keys
        total += 2 * b * (L * 12 * H * H + H * V) + L * 4 * b * (p + t) * H
    return total


def check_throughput(rep, batch, tokens_per_sample):
    approx = pytest.approx
    assert rep["e2e_latency_s"] == approx(sum(rep["iteration_latencies_s"]) / rep["iters"])
    assert len(rep["iteration_latencies_s"]) == rep["iters"]
    assert rep["samples_per_s"] == approx(batch / rep["e2e_latency_s"])
    assert rep["tokens_per_iteration"] == batch * tokens_per_sample
    assert rep["tokens_per_s"] == approx(batch * tokens_per_sample / rep["e2e_latency_s"])
    assert rep["tokens_per_s_per_device"] == approx(rep["tokens_per_s"] / rep["world_size"])
    tflops = rep["flops_per_iteration"] / rep["e2e_latency_s"] / rep["world_size"] / 1e12
    assert rep["tflops_per_device"] == approx(tflops)
    assert rep["mfu"] == approx(tflops / rep["peak_tflops"])
    assert len(rep["peak_memory_bytes"]) == rep["world_size"]
    assert all(m > 50 * 2**20 for m in rep["peak_memory_bytes"])  # a torch process at least
    assert rep["peak_memory_source"] == "cpu_peak_rss"


def test_ppo_fields_and_consistency(tmp_path):
    rep = run_tool(
        tmp_path, *SHAPE, "--ppo-epochs", "2", "--iters", "2", "--warmup", "1", "--peak-tflops",
        "0.5",
    )  # fmt: skip
    assert (rep["stage"], rep["batch"], rep["prompt_len"], rep["response_len"]) == ("ppo", B, P, N)
    assert (rep["world_size"], rep["tp"], rep["pp"], rep["dp"]) == (1, 1, 1, 1)
    assert rep["peak_tflops"] == 0.5 and rep["peak_tflops_source"] == "--peak-tflops"
    assert rep["micro_batch_size"] == B  # a whole minibatch per forward by default
    s = P + N
    # actor + reference forwards (lm head at the N positions predicting a response token),
    # critic (one-output head, the same N) + reward (its last token) forwards, then 2 epochs of
    # training (3 x forward) of the actor and of the critic.
    expected = (
        gen_flops(B, P, N)
        + 2 * fwd(B, s, N, V)
        + fwd(B, s, N, 1)
        + fwd(B, s, 1, 1)
        + 2 * 3 * (fwd(B, s, N, V) + fwd(B, s, N, 1))
    )
    assert rep["flops_per_iteration"] == pytest.approx(expected, rel=1e-12)
    check_throughput(rep, B, s)
    assert rep["generated_tokens_per_s"] == pytest.approx(B * N / rep["e2e_latency_s"])
    stages = rep["stages"]
    assert set(stages) == {
        "generate", "reshard", "actor_forward", "reference_forward", "critic_forward",
        "reward_forward", "advantages", "actor_update", "critic_update",
    }  # fmt: skip
    assert all(st["latency_s"] > 0 for st in stages.values())
    assert sum(st["latency_s"] for st in stages.values()) <= rep["e2e_latency_s"]
    g = stages["generate"]
    assert g["per_token_latency_ms"] == pytest.approx(1e3 * g["latency_s"] / N)
    assert g["flops"] == pytest.approx(gen_flops(B, P, N), rel=1e-12)
    assert g["tflops_per_device"] == pytest.approx(g["flops"] / g["latency_s"] / 1e12)
    assert "tflops_per_device" not in stages["advantages"]
    # Phase MFUs: each phase's FLOPs over its own time, against the same peak.
    upd = stages["actor_update"]["flops"] + stages["critic_update"]["flops"]
    t_upd = stages["actor_update"]["latency_s"] + stages["critic_update"]["latency_s"]
    assert rep["train_mfu"] == pytest.approx(upd / t_upd / 1e12 / 0.5, rel=1e-9)
    assert rep["generate_mfu"] == pytest.approx(g["flops"] / g["latency_s"] / 1e12 / 0.5)
    assert rep["params"] == V * H + 256 * H + L * (12 * H * H + 13 * H) + 2 * H  # + wpe 256 rows


def test_variable_length_mode(tmp_path):
    """--eos-rate: the random models stop at EOS, responses vary; FLOPs follow the mean length."""
    rep = run_tool(tmp_path, "--model", "tiny_gpt2", "--batch", "8", "--prompt-len", "8",
                   "--response-len", "24", "--iters", "2", "--warmup", "1", "--peak-tflops", "1",
                   "--eos-rate", "0.1")  # fmt: skip
    n = rep["mean_response_length"]
    assert 1 <= n < 24  # EOS at 0.1 per token: about 9 tokens, far below 24
    assert rep["stages"]["generate"]["flops"] == pytest.approx(gen_flops(8, 8, n), rel=1e-12)


def test_ppo_without_old_logprob_recompute(tmp_path):
    rep = run_tool(tmp_path, *SHAPE, "--iters", "1", "--warmup", "1", "--peak-tflops", "1",
                   "ppo.recompute_old_logprobs=false")  # fmt: skip
    s = P + N
    assert rep["recompute_old_logprobs"] is False
    # one epoch; no actor forward: reference (lm head), critic and reward forwards only
    expected = gen_flops(B, P, N) + fwd(B, s, N, V) + fwd(B, s, N, 1) + fwd(B, s, 1, 1)
    expected += 3 * (fwd(B, s, N, V) + fwd(B, s, N, 1))
    assert rep["flops_per_iteration"] == pytest.approx(expected, rel=1e-12)
    assert rep["stages"]["actor_forward"]["flops"] == 0.0
    assert rep["stages"]["actor_forward"]["latency_s"] < 0.01
    check_throughput(rep, B, s)


def test_torchrun_two_ranks_data_parallel_zero1(tmp_path):
    torchrun = str(Path(sys.executable).parent / "torchrun")
    launcher = (torchrun, "--nproc_per_node", "2", "--master_port", "29647")
    rep = run_tool(tmp_path, *SHAPE, "--zero-stage", "1", "--iters", "1", "--warmup", "1",
                   "--peak-tflops", "1", launcher=launcher)  # fmt: skip
    assert (rep["world_size"], rep["tp"], rep["dp"], rep["zero_stage"]) == (2, 1, 2, 1)
    assert rep["micro_batch_size"] == B // 2  # a whole minibatch of this DP rank
    check_throughput(rep, B, P + N)  # per device = total / 2; two memory entries


def test_sft_stage_with_measured_peak(tmp_path):
    rep = run_tool(tmp_path, *SHAPE, "--stage", "sft", "--iters", "2", "--warmup", "1")
    s = P + N
    assert rep["stage"] == "sft"
    assert rep["flops_per_iteration"] == pytest.approx(3 * fwd(B, s, s, V), rel=1e-12)
    # The default dtype is the one this machine's matmuls run fast, and so is the peak's.
    want = "bf16" if fast_bf16_device() else "fp32"
    assert rep["model"]["dtype"] == want and rep["dtype"] == want
    assert rep["peak_tflops"] > 0 and rep["peak_tflops_source"].startswith(f"measured {want}")
    check_throughput(rep, B, s)


def test_rm_stage(tmp_path):
    rep = run_tool(tmp_path, *SHAPE, "--stage", "rm", "--iters", "1", "--warmup", "1",
                   "--peak-tflops", "1")  # fmt: skip
    s = P + N
    assert rep["flops_per_iteration"] == pytest.approx(3 * fwd(B, s, s, 1), rel=1e-12)
    check_throughput(rep, B, s)


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl is not installed")
def test_compare_trl(tmp_path):
    rep = run_tool(tmp_path, *SHAPE, "--iters", "2", "--warmup", "1", "--compare-trl",
                   "--peak-tflops", "1")  # fmt: skip
    # TRL in fp32 and under bf16 autocast, each alternating with 2 of ours: 4 of ours in all.
    times = {k: rep[f"trl_{k}_iteration_latencies_s"] for k in ("fp32", "bf16")}
    assert all(len(t) == 2 and min(t) > 0 for t in times.values())
    for k, t in times.items():
        assert rep[f"trl_{k}_samples_per_s"] == pytest.approx(B / (sum(t) / 2))
    faster = min(times, key=lambda k: sorted(times[k])[0] + sorted(times[k])[1])
    assert rep["trl_faster_setting"] == faster
    assert rep["trl_samples_per_s"] == rep[f"trl_{faster}_samples_per_s"]
    ours = sorted(rep["iteration_latencies_s"])
    assert len(ours) == 4
    want = (times[faster][0] + times[faster][1]) / 2 / ((ours[1] + ours[2]) / 2)  # medians
    assert rep["trl_ratio"] == pytest.approx(want)
    assert rep["trl_ratio_mean"] == pytest.approx(rep["samples_per_s"] / rep["trl_samples_per_s"])


def test_compare_hf_generate(tmp_path):
    # fp32 on both sides: greedy tokens must match exactly (bf16 rounds differently per kernel).
    rep = run_tool(tmp_path, *SHAPE, "--iters", "2", "--warmup", "1", "--compare-hf-generate",
                   "--dtype", "fp32", "--latency-batches", "1,2")  # fmt: skip
    assert rep["greedy_match"] is True and rep["dtype"] == "fp32"
    assert set(rep["per_token_latency_ms"]) == {"1", "2"}
    assert all(
        v["ours"] > 0 and v["transformers"] > 0 for v in rep["per_token_latency_ms"].values()
    )
    assert (rep["batch"], rep["new_tokens"]) == (B, N)
    assert rep["latency_s"] == pytest.approx(sum(rep["latencies_s"]) / 2)
    assert rep["tokens_per_s"] == pytest.approx(B * N / rep["latency_s"])
    assert rep["hf_tokens_per_s"] == pytest.approx(B * N / rep["hf_latency_s"])
    # Two runs each: the ratio of medians is the ratio of means.
    assert rep["hf_generate_ratio"] == pytest.approx(rep["hf_latency_s"] / rep["latency_s"])


def test_hybrid_generates_in_place_like_the_copy():
    """The benchmark's one-process PPO generates with the actor itself (generation layout =
    training layout); the tokens and log-probs equal those of the re-sharded copy, and the
    actor's training mode is restored."""
    import torch

    from megarlhf.config import GenerationConfig
    from megarlhf.engine.hybrid import HybridEngine
    from megarlhf.model.gpt import GPTModel
    from megarlhf.parallel.state import single_process_state
    from tests.model.common import tiny_config

    ps = single_process_state()
    actor = GPTModel(tiny_config("llama"), ps, seed=5).train()
    gen = GenerationConfig(max_new_tokens=5, temperature=0.9, seed=2)
    engine = HybridEngine(actor, ps, gen, eos_id=None, pad_id=0)
    prompts = [[5, 6, 7], [9, 10], [11, 12, 13, 14]]
    assert engine.generates_in_place()
    in_place = engine.rollout(prompts, step=3)
    assert actor.training
    engine.generates_in_place = lambda: False
    copied = engine.rollout(prompts, step=3)
    for a, b in zip(in_place, copied, strict=True):
        assert (a.prompt, a.response) == (b.prompt, b.response) and len(a.response) == 5
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-6)
