"""Throughput of PPO iterations (or SFT / RM steps) on synthetic prompts, under any launcher.

    # PPO at a model preset with overrides, one process
    python tools/bench_throughput.py --model tiny_gpt2 model.hidden_size=256 --iters 5
    # N ranks, a training layout, ZeRO stage
    torchrun --nproc_per_node 2 tools/bench_throughput.py --model tiny_llama --tp 2 --iters 3
    deepspeed --num_gpus 8 tools/bench_throughput.py --model llama_7b --tp 8 --zero-stage 1
    # SFT or RM optimizer steps instead of PPO
    python tools/bench_throughput.py --stage sft --model gpt2_124m --batch 8 --prompt-len 512
    # against TRL's PPO, and against transformers' generate (one process)
    python tools/bench_throughput.py --model tiny_gpt2 --compare-trl --json out.json
    python tools/bench_throughput.py --model smollm2_135m --compare-hf-generate

Prompts are random token ids of exactly --prompt-len tokens; models are randomly initialized;
EOS does not stop generation (unless --eos-rate), so every response is exactly --response-len
tokens and every iteration does the same work. --warmup iterations run first and are not
counted. Output: end-to-end latency, samples/s, per-stage latencies, tokens/s, achieved TFLOPs
per device and MFU against --peak-tflops (default: a matmul peak measured in the run's dtype on
CPU, the data-sheet value on CUDA), training- and generation-phase MFU, and peak memory per rank;
--json writes the same as one object. Fields and formulas: docs/bench.md.
A bad preset, override, layout or flag combination is one line `bench_throughput.py: error: ...`
and exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

# Threads must be fixed before torch starts its pools (train_common imports no torch).
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from megarlhf.utils.threads import set_threads_per_rank  # noqa: E402
from tools.train_common import exit_with_launcher  # noqa: E402

PROG = "bench_throughput.py"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench_throughput.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--stage", choices=("ppo", "sft", "rm"), default="ppo")
    p.add_argument(
        "--model", default="tiny_gpt2", help="preset name in configs/models/ or a YAML path"
    )
    p.add_argument("--iters", type=int, default=3, help="measured iterations (per side)")
    p.add_argument("--warmup", type=int, default=1, help="uncounted iterations first")
    p.add_argument("--batch", type=int, default=16, help="samples per iteration (all ranks)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--response-len", type=int, default=64)
    p.add_argument("--ppo-epochs", type=int, default=1)
    p.add_argument("--num-minibatches", type=int, default=1)
    p.add_argument(
        "--micro-batch-size",
        type=int,
        default=0,
        help="sequences per forward/backward per DP rank (0: a whole minibatch)",
    )
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--zero-stage", type=int, default=1)
    p.add_argument(
        "--dtype",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="model.dtype (auto: bf16 where matmuls run it fast: CUDA, or a CPU with AMX-BF16 / "
        "AVX512-BF16; else fp32); a model.dtype override wins",
    )
    p.add_argument(
        "--eos-rate",
        type=float,
        default=0.0,
        help="variable-length mode: the random models emit EOS at this rate per token (GPT-2 "
        "family; e.g. 0.03), ours and TRL's alike; 0: every response is --response-len long",
    )
    p.add_argument(
        "--latency-batches",
        default="",
        help="with --compare-hf-generate: also per-token latency at these batch sizes (1,8,64)",
    )
    p.add_argument(
        "--profile", default=None, metavar="PATH",
        help="profile one more PPO iteration (torch.profiler) into PATH",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=0.0,
        help="per-device peak for MFU (0: a matmul peak measured in the run's dtype on CPU, "
        "the data sheet's on CUDA)",
    )
    p.add_argument("--json", default=None, metavar="PATH", help="write the report here")
    p.add_argument("--compare-trl", action="store_true", help="also time TRL's PPOTrainer")
    p.add_argument(
        "--compare-hf-generate",
        action="store_true",
        help="only time our generate against transformers' generate on the same weights",
    )
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.hidden_size=256")
    args = p.parse_intermixed_args(argv)
    if args.iters < 1 or args.warmup < 0:
        p.error("--iters must be >= 1 and --warmup >= 0")
    return args


def init_process_group(timeout_s: float) -> tuple[int, str | None]:
    """Join the launcher's process group, or make a gloo world of one (as train_common does)."""
    import torch.distributed as dist

    from megarlhf.parallel.state import init_distributed

    if "RANK" in os.environ:
        rank, _ = init_distributed(timeout_s)
        return rank, None
    store_dir = tempfile.mkdtemp(prefix="megarlhf_bench_")
    dist.init_process_group("gloo", init_method=f"file://{store_dir}/store", rank=0, world_size=1)
    os.environ.setdefault("LOCAL_RANK", "0")
    return 0, store_dir


# ----------------------------------------------------------------------------- configuration


def build_run_config(args: argparse.Namespace):
    """The PPORunConfig of the benchmark: the model preset plus `model.*` overrides, the layout,
    the batch shape, no PTX, no checkpoints or TensorBoard; other dotted overrides on top.
    (SFT / RM steps use its model, parallel, optim and deepspeed sections.)"""
    import dataclasses

    from megarlhf.config import ModelFileConfig, from_dict, load_config, parse_overrides, to_dict
    from megarlhf.config.ppo import PPORunConfig

    preset = Path(args.model)
    if preset.suffix not in (".yaml", ".yml"):
        preset = ROOT / "configs" / "models" / f"{args.model}.yaml"
    model_ov = [o for o in args.overrides if o.startswith("model.")]
    if not any(o.startswith("model.dtype=") for o in model_ov):
        model_ov.append(f"model.dtype={resolve_dtype(args.dtype)}")
    model = load_config(ModelFileConfig, preset, model_ov).model
    need = args.prompt_len + args.response_len
    if model.max_seq_len < need:
        model = dataclasses.replace(model, max_seq_len=need)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dp = max(world // (args.tp * args.pp), 1)
    micro = args.micro_batch_size or max(args.batch // (dp * args.num_minibatches), 1)
    data = {
        "model": to_dict(model),
        "parallel": {"tp": args.tp, "pp": args.pp},
        "data": {"tokenizer": str(ROOT / "data" / "tokenizer"), "max_prompt_len": args.prompt_len},
        "generation": {"max_new_tokens": args.response_len, "temperature": 1.0, "seed": args.seed},
        "deepspeed": {"zero_stage": args.zero_stage},
        "ppo": {
            "rollout_batch_size": args.batch,
            "micro_batch_size": micro,
            "num_minibatches": args.num_minibatches,
            "ppo_epochs": args.ppo_epochs,
            "max_steps": args.warmup + args.iters,
            "seed": args.seed,
            "ptx_coef": 0.0,
        },
        "checkpoint": {"save_final": False, "resume": "never"},
        "logging": {"tensorboard": False, "progress_bar": False, "log_every": 0},
    }
    stack = [(data, parse_overrides([o for o in args.overrides if not o.startswith("model.")]))]
    while stack:  # deep merge of the remaining overrides
        dst, src = stack.pop()
        for k, v in src.items():
            if isinstance(v, dict) and isinstance(dst.get(k), dict):
                stack.append((dst[k], v))
            else:
                dst[k] = v
    return from_dict(PPORunConfig, data)


def resolve_dtype(choice: str) -> str:
    """--dtype auto: bf16 where the device runs bf16 matmuls fast."""
    if choice != "auto":
        return choice
    from megarlhf.perf.bench import fast_bf16_device

    return "bf16" if fast_bf16_device() else "fp32"


# ----------------------------------------------------------------------------- measuring


def peak_tflops(args: argparse.Namespace, cfg) -> tuple[float, str]:
    """The MFU denominator in the run's dtype, and where it came from."""
    import torch

    from megarlhf.perf.bench import cuda_peak_tflops, measured_peak

    if args.peak_tflops > 0:
        return args.peak_tflops, "--peak-tflops"
    dtype = cfg.model.dtype
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        table = cuda_peak_tflops(name, dtype)
        if table is not None:
            return table, f"data sheet, {name} {dtype}"
        return measured_peak(dtype, "cuda", 8192)
    return measured_peak(dtype)


def gathered(value) -> list:
    """`value` of every rank, in rank order (a list of one without a process group)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def model_params(model, ps) -> int:
    """Parameters of the whole model: the local counts of the dp-rank-0 replicas summed."""
    local = sum(p.numel() for p in model.parameters())
    return sum(n for n, dp_rank in gathered((local, ps.dp_rank)) if dp_rank == 0)


def common_fields(args, cfg, ps, params: int, peak: tuple[float, str]) -> dict:
    import torch

    return {
        "stage": args.stage,
        "model_name": args.model,
        "model": {
            k: getattr(cfg.model, k)
            for k in ("family", "hidden_size", "num_layers", "num_heads", "vocab_size", "dtype")
        },
        "dtype": cfg.model.dtype,  # the models' compute dtype, also the peak's
        "params": params,
        "world_size": ps.world_size,
        "tp": ps.tp_size,
        "pp": ps.pp_size,
        "dp": ps.dp_size,
        "zero_stage": cfg.deepspeed.zero_stage,
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "response_len": args.response_len,
        "ppo_epochs": args.ppo_epochs,
        "num_minibatches": args.num_minibatches,
        "micro_batch_size": cfg.ppo.loop.micro_batch_size,
        "recompute_old_logprobs": cfg.ppo.rollout.recompute_old_logprobs,
        "iters": args.iters,
        "warmup": args.warmup,
        "peak_tflops": peak[0],
        "peak_tflops_source": peak[1],
        "threads": torch.get_num_threads(),
    }


def run_stage(cfg, args: argparse.Namespace) -> dict:
    """Build the layout and run the chosen stage; the report (complete on rank 0)."""
    from megarlhf.parallel.state import build_parallel_state

    ps = build_parallel_state(cfg.parallel.tp, cfg.parallel.pp, cfg.loop.dist_timeout_s)
    peak = peak_tflops(args, cfg)
    if args.stage == "ppo":
        return run_ppo(cfg, args, ps, peak)
    return run_train_steps(cfg, args, ps, peak)


def run_ppo(cfg, args, ps, peak) -> dict:
    """Warm-up, then --iters PPO iterations (alternating with TRL's under --compare-trl: first
    with TRL in fp32, then with TRL under bf16 autocast)."""
    from megarlhf.perf.bench import peak_memory_bytes, synthetic_prompts
    from megarlhf.trainers.ppo import PPOTrainer

    prompts = synthetic_prompts(args.batch, args.prompt_len, cfg.model.vocab_size, args.seed)
    with tempfile.TemporaryDirectory(prefix="megarlhf_bench_out_") as out:
        trainer = PPOTrainer(cfg, ps, out, prompts=prompts, stop_at_eos=args.eos_rate > 0)
        trainer.setup()
        if args.eos_rate > 0:
            install_eos_rate(trainer, args.eos_rate)
        one = measured_step(trainer, args)
        for _ in range(args.warmup):
            one()
        mem, mem_source = peak_memory_bytes()  # before TRL shares the process
        records, trl = [], {}
        settings = ("fp32", "bf16") if args.compare_trl else (None,)
        for setting in settings:
            peer = build_peer(cfg, args, prompts, trainer, setting, Path(out))
            for _ in range(args.iters):  # alternate: one of ours, one of TRL's
                records.append(one())
                if peer is not None:
                    trl.setdefault(setting, []).extend(run_trl_iterations(*peer, 1))
        if args.profile:
            profile_iteration(one, args.profile)
        params = model_params(trainer.actor.module, ps)
    rep = common_fields(args, cfg, ps, params, peak)
    rep.update(ppo_fields(cfg, args, ps, records, peak[0]))
    rep["peak_memory_bytes"], rep["peak_memory_source"] = gathered(mem), mem_source
    if trl:
        rep.update(trl_fields(trl, rep, args))
    return rep


def measured_step(trainer, args):
    """One counted PPO iteration; with fixed lengths, checks every response has them."""

    def one() -> dict:
        rec = trainer.run_step()
        if args.eos_rate == 0 and rec["response_length"] != args.response_len:
            raise RuntimeError(f"responses of {rec['response_length']} tokens, not fixed")
        return rec

    return one


def install_eos_rate(trainer, rate: float) -> None:
    """Our actor and reference emit EOS at `rate` per token (megarlhf.perf.eos_rate; the actor's
    fp32 master weights are edited too, so its updates start from the edited weights)."""
    from megarlhf.optim.deepspeed_model import edit_parameter

    cfg, eos = trainer.cfg.model, trainer.tokenizer.eos_id
    if cfg.family != "gpt2" or trainer.ps.world_size > 1:
        raise ValueError("--eos-rate needs a gpt2-family model on one rank")
    for model in (trainer.actor.module, trainer.reference.model):
        emb, bias = model.embedding.word.weight, model.final_norm.bias
        edit_parameter(emb, lambda w: _eos_row(w, eos, rate, cfg.vocab_size))
        edit_parameter(bias, _eos_bias)


def _eos_row(w, eos: int, rate: float, vocab: int) -> None:
    from megarlhf.perf.eos_rate import BIAS, eos_logit

    w[eos].zero_()
    w[eos, 0] = eos_logit(rate, vocab) / BIAS


def _eos_bias(b) -> None:
    from megarlhf.perf.eos_rate import BIAS

    b[0] += BIAS


def build_peer(cfg, args, prompts, trainer, setting: str | None, out: Path):
    """TRL's trainer in `setting` ("fp32", "bf16"), warmed up; None without --compare-trl."""
    if setting is None:
        return None
    from megarlhf.perf.trl_peer import build_trl_ppo, reset_accelerate, run_trl_iterations

    reset_accelerate()
    peer = build_trl_ppo(
        dataclasses.replace(cfg.model, dtype="fp32"),
        prompts,
        response_len=args.response_len,
        ppo_epochs=args.ppo_epochs,
        num_minibatches=args.num_minibatches,
        lr=cfg.optim.lr,
        kl_coef=cfg.ppo.algo.kl_coef,
        seed=args.seed,
        output_dir=out / f"trl_{setting}",
        pad_id=trainer.tokenizer.pad_id,
        eos_id=trainer.tokenizer.eos_id,
        bf16=setting == "bf16",
        eos_rate=args.eos_rate,
    )
    if args.warmup:
        run_trl_iterations(*peer, args.warmup)
    return peer


def run_trl_iterations(trainer, timer, n: int) -> list[float]:
    from megarlhf.perf.trl_peer import run_trl_iterations as run

    return run(trainer, timer, n)


def profile_iteration(one, path: str) -> None:
    """One more iteration under torch.profiler; its top operators (self CPU time) into `path`."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        one()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    Path(path).write_text(table + "\n")


def ppo_fields(cfg, args, ps, records: list[dict], peak: float) -> dict:
    """The PPO report of the measured iterations: FLOPs at the measured mean response length
    (the work done: packing skips padding), phase MFUs."""
    from megarlhf.perf.bench import phase_mfu, ppo_report
    from megarlhf.perf.flops import ppo_iteration_flops

    n = round(statistics.mean(r["response_length"] for r in records))
    critic = cfg.critic_model()
    flops = ppo_iteration_flops(
        cfg.model, critic, critic, args.batch, args.prompt_len, n, args.ppo_epochs
    )
    if not cfg.ppo.rollout.recompute_old_logprobs:  # generation's log-probs: no actor forward
        flops["total"] -= flops["actor_forward"]
        flops["actor_forward"] = 0.0
    rep = ppo_report(records, flops, args.batch, args.prompt_len, n, ps.world_size, peak)
    rep.update(phase_mfu(records, flops, ps.world_size, peak))
    rep["mean_response_length"] = n
    return rep


def trl_fields(trl: dict, rep: dict, args) -> dict:
    """TRL's samples/s per setting and the ratio of medians against the faster one."""
    ours = statistics.median(rep["iteration_latencies_s"])
    out = {}
    for setting, times in trl.items():
        out[f"trl_{setting}_iteration_latencies_s"] = times
        out[f"trl_{setting}_samples_per_s"] = args.batch / statistics.mean(times)
    faster = min(trl, key=lambda k: statistics.median(trl[k]))
    out["trl_faster_setting"] = faster
    out["trl_samples_per_s"] = out[f"trl_{faster}_samples_per_s"]
    out["trl_e2e_latency_s"] = statistics.mean(trl[faster])
    # Ratio of medians: robust to one iteration hit by a load spike on a shared machine.
    out["trl_ratio"] = statistics.median(trl[faster]) / ours
    out["trl_ratio_mean"] = rep["samples_per_s"] / out["trl_samples_per_s"]
    return out


def run_train_steps(cfg, args, ps, peak) -> dict:
    """--stage sft|rm: optimizer steps of the actor (next-token loss) or of a scalar-head model
    (pairwise ranking loss, pairs of consecutive rows) over [batch, prompt + response] tokens."""
    import time

    import torch

    from megarlhf.model.gpt import GPTModel
    from megarlhf.optim.deepspeed_model import DeepSpeedModel
    from megarlhf.parallel.pipeline import get_forward_backward_func
    from megarlhf.perf.bench import mean, peak_memory_bytes, throughput_fields
    from megarlhf.perf.flops import train_flops
    from megarlhf.trainers.rm import make_rm_loss_fn
    from megarlhf.trainers.sft import make_sft_loss_fn

    model_cfg = cfg.model if args.stage == "sft" else cfg.critic_model()
    optim = cfg.optim if args.stage == "sft" else cfg.critic_optim
    micro = cfg.ppo.loop.micro_batch_size
    if args.stage == "rm" and args.batch % 2:
        raise ValueError(f"--batch {args.batch}: RM steps take pairs, it must be even")
    steps = args.warmup + args.iters
    engine = DeepSpeedModel(
        GPTModel(model_cfg, ps, seed=args.seed),
        ps,
        optim=optim,
        deepspeed=cfg.deepspeed,
        micro_batch_size=micro,
        grad_accum=1,
        total_steps=steps,
    )
    fwd_bwd = get_forward_backward_func(ps)
    s = args.prompt_len + args.response_len
    local = args.batch // ps.dp_size
    g = torch.Generator().manual_seed(args.seed + ps.dp_rank)
    ids = torch.randint(4, cfg.model.vocab_size, (local, s), generator=g)
    mbs = []
    for i in range(0, local, micro):
        mb = {"input_ids": ids[i : i + micro]}
        n = mb["input_ids"].shape[0]
        if args.stage == "sft":
            labels = torch.roll(mb["input_ids"], -1, dims=1)
            labels[:, -1] = -100
            mb["labels"] = labels
        else:
            mb["attention_mask"] = torch.ones(n, s, dtype=torch.long)
            mb["group_sizes"] = torch.full((n // 2,), 2)
            mb["ranks"] = torch.tensor([1, 2] * (n // 2))
        mbs.append(mb)
    if args.stage == "sft":
        loss_fn = make_sft_loss_fn(float(args.batch * (s - 1)), ps.tp_group)
    else:
        loss_fn = make_rm_loss_fn(float(args.batch // 2))
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        engine.begin_step(len(mbs))
        fwd_bwd(
            model=engine, micro_batches=mbs, loss_fn=loss_fn, ps=ps, backward_fn=engine.backward
        )
        engine.step()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    mem, mem_source = peak_memory_bytes()
    rep = common_fields(args, cfg, ps, model_params(engine.module, ps), peak)
    flops = train_flops(model_cfg, args.batch, s)
    rep.update(
        throughput_fields(mean(times), args.batch, args.batch * s, flops, ps.world_size, peak[0])
    )
    rep["iteration_latencies_s"] = times
    rep["peak_memory_bytes"], rep["peak_memory_source"] = gathered(mem), mem_source
    return rep


def compare_hf_generate(cfg, args: argparse.Namespace) -> dict:
    """Greedy KV-cache generation of our GPTModel against transformers' generate on the same
    weights in the same dtype (converted by megarlhf_to_hf): --batch prompts of --prompt-len,
    --response-len new tokens, alternating runs; one process, no process group. With
    --latency-batches, the per-token latency of both at each of those batch sizes too."""
    import torch

    from megarlhf.model.gpt import GPTModel
    from megarlhf.parallel.state import single_process_state
    from megarlhf.perf.bench import to_hf_causal_lm

    ours = GPTModel(cfg.model, single_process_state(), seed=args.seed).eval()
    with tempfile.TemporaryDirectory(prefix="megarlhf_bench_hf_") as work:
        hf = to_hf_causal_lm(ours, work, dtype=next(ours.parameters()).dtype)
    rep = {
        "stage": "generate",
        "model_name": args.model,
        "dtype": cfg.model.dtype,
        "params": sum(p.numel() for p in ours.parameters()),
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "new_tokens": args.response_len,
        "iters": args.iters,
        "warmup": args.warmup,
        "threads": torch.get_num_threads(),
        "transformers_attn_implementation": hf.config._attn_implementation,
    }
    rep.update(generate_pair(ours, hf, args.batch, args))
    rep["per_token_latency_ms"] = {}
    for b in [int(x) for x in args.latency_batches.split(",") if x.strip()]:
        pair = generate_pair(ours, hf, b, args)
        n = args.response_len
        rep["per_token_latency_ms"][str(b)] = {
            "ours": 1e3 * pair["latency_s"] / n,
            "transformers": 1e3 * pair["hf_latency_s"] / n,
        }
    return rep


def generate_pair(ours, hf, batch: int, args) -> dict:
    """Alternating timed greedy generations of `batch` prompts by ours and by transformers."""
    import time

    import torch

    from megarlhf.config import GenerationConfig
    from megarlhf.model.generation import generate
    from megarlhf.perf.bench import mean, synthetic_prompts

    n = args.response_len
    ids = torch.tensor(synthetic_prompts(batch, args.prompt_len, ours.cfg.vocab_size, args.seed))
    mask = torch.ones_like(ids)
    gen = GenerationConfig(max_new_tokens=n, temperature=0.0)

    def run_ours():
        return generate(ours, ids, mask, gen, None, 0).responses

    @torch.inference_mode()
    def run_hf():
        out = hf.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
            do_sample=False, eos_token_id=None, pad_token_id=0,
        )  # fmt: skip
        return out[:, ids.shape[1] :]

    def timed(fn):
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, out

    for _ in range(args.warmup):
        run_ours(), run_hf()
    t_ours, t_hf, match = [], [], True
    for _ in range(args.iters):  # alternate
        t, a = timed(run_ours)
        t_ours.append(t)
        t, b = timed(run_hf)
        t_hf.append(t)
        match = match and a.shape == b.shape and bool((a == b).all())
    lo, lh = mean(t_ours), mean(t_hf)
    return {
        "latency_s": lo,
        "hf_latency_s": lh,
        "latencies_s": t_ours,
        "hf_latencies_s": t_hf,
        "tokens_per_s": batch * n / lo,
        "hf_tokens_per_s": batch * n / lh,
        "hf_generate_ratio": statistics.median(t_hf) / statistics.median(t_ours),
        "greedy_match": match,
    }


# ----------------------------------------------------------------------------- output


def print_report(rep: dict) -> None:
    """The human-readable form of the report (the JSON holds the same numbers)."""
    print(
        f"bench {rep['stage']}: model {rep['model_name']} ({rep['params'] / 1e6:.2f}M params), "
        f"world {rep['world_size']} (tp {rep['tp']} pp {rep['pp']} dp {rep['dp']}, "
        f"zero {rep['zero_stage']}), batch {rep['batch']}, prompt {rep['prompt_len']}, "
        f"response {rep['response_len']}, {rep['iters']} iterations after {rep['warmup']} warm-up"
    )
    print(
        f"  e2e latency {rep['e2e_latency_s'] * 1e3:.1f} ms  samples/s {rep['samples_per_s']:.2f}"
        f"  tokens/s {rep['tokens_per_s']:.0f} ({rep['tokens_per_s_per_device']:.0f} per device)"
    )
    for name, st in rep.get("stages", {}).items():
        extra = ""
        if "per_token_latency_ms" in st:
            extra += f"  {st['per_token_latency_ms']:.2f} ms/token"
        if "tflops_per_device" in st:
            extra += f"  {st['tflops_per_device']:.3f} TFLOPs/device"
        print(f"  {name:<18} {st['latency_s'] * 1e3:9.1f} ms{extra}")
    print(
        f"  {rep['tflops_per_device']:.3f} TFLOPs per device, MFU {100 * rep['mfu']:.1f}% of "
        f"{rep['peak_tflops']:.2f} TFLOPs ({rep['peak_tflops_source']}); "
        f"{rep['threads']} threads per rank"
    )
    mem = ", ".join(f"{b / 2**20:.0f}" for b in rep["peak_memory_bytes"])
    print(f"  peak memory per rank (MiB, {rep['peak_memory_source']}): {mem}")
    if "train_mfu" not in rep:
        return
    print(
        f"  training-phase MFU {100 * rep['train_mfu']:.1f}%, generation-phase MFU "
        f"{100 * rep['generate_mfu']:.1f}%, mean response {rep['mean_response_length']:.1f} tokens"
    )
    if "trl_samples_per_s" in rep:
        per = ", ".join(
            f"{k} {rep[f'trl_{k}_samples_per_s']:.2f} samples/s" for k in ("fp32", "bf16")
        )
        print(
            f"  TRL {per}; ours / TRL ({rep['trl_faster_setting']}, the faster) = "
            f"{rep['trl_ratio']:.2f}x (ratio of medians; means {rep['trl_ratio_mean']:.2f}x)"
        )


def print_generate_report(rep: dict) -> None:
    print(
        f"generate: model {rep['model_name']} ({rep['params'] / 1e6:.2f}M params, "
        f"{rep['dtype']} on both sides), batch {rep['batch']}, prompt {rep['prompt_len']}, "
        f"{rep['new_tokens']} new tokens, greedy, {rep['iters']} runs each after "
        f"{rep['warmup']} warm-up, alternating"
    )
    print(
        f"  ours {rep['tokens_per_s']:.0f} tokens/s ({rep['latency_s'] * 1e3:.1f} ms)  "
        f"transformers {rep['hf_tokens_per_s']:.0f} tokens/s ({rep['hf_latency_s'] * 1e3:.1f} ms)"
        f"  ratio {rep['hf_generate_ratio']:.2f}x (medians)  greedy tokens equal: "
        f"{rep['greedy_match']}"
    )
    for b, lat in rep["per_token_latency_ms"].items():
        print(
            f"  batch {b:>3}: {lat['ours']:.2f} ms/token ours, {lat['transformers']:.2f} ms/token "
            "transformers"
        )


def error(message: str) -> int:
    """A bad input: one line, exit status 2."""
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    args = parse_args(argv)
    exit_with_launcher()
    set_threads_per_rank()
    warnings.filterwarnings(
        "ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning
    )
    from megarlhf.checkpoint.errors import CheckpointError
    from megarlhf.config import ConfigError
    from megarlhf.data.tokenizer import TokenizerError

    try:
        cfg = build_run_config(args)
    except (ConfigError, ValueError) as e:
        return error(str(e))
    if args.compare_hf_generate:
        rep = compare_hf_generate(cfg, args)
        print_generate_report(rep)
    else:
        if args.compare_trl and "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", 1)) > 1:
            return error("--compare-trl runs in one process")
        from megarlhf.parallel.state import shutdown_distributed

        rank, store_dir = init_process_group(cfg.loop.dist_timeout_s)
        try:
            rep = run_stage(cfg, args)
            # Only on success: after an error a barrier would wait on ranks that are gone.
            shutdown_distributed()
        except (ConfigError, TokenizerError, CheckpointError) as e:  # a layout that does not fit
            return error(f"{type(e).__name__}: {e}")
        finally:
            if store_dir is not None:
                import shutil

                shutil.rmtree(store_dir, ignore_errors=True)
        if rank != 0:
            return 0
        print_report(rep)
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
