"""Plan a PPO job: per-GPU memory of actor, critic, reference and reward model in the hybrid
setup, by phase (rollout, experience, training), whether it fits, and the step time at an MFU.

    python tools/plan.py --model llama_7b --nodes 4 --gpus-per-node 8 --gpu-mem 80 --tp 4
    python tools/plan.py --model llama_70b --nodes 8 --tp 8 --pp 4 --zero 1 --gen-tp 8 \\
        --colocate actor,critic,reference --offload-frozen --json
    python tools/plan.py --model configs/models/gpt2_124m.yaml --gpus-per-node 1 --dtype fp32 \\
        --zero 0 model.num_layers=6
    python tools/plan.py --model llama_7b --gpus-per-node 8 --lora-rank 16 --lora-targets qkv,proj

--model is a preset name in configs/models/ or a YAML path; `model.key=value` arguments override
it. DP is world / (tp * pp) when --dp is omitted. The model and its formulas (and how they were
checked against measured peaks) are in megarlhf/perf/memory.py and docs/plan.md.

Exit status: 0 when the job fits, 1 when it does not, 2 for a bad input (one line `plan.py:
error: --flag: why`; a malformed command line also prints the usage, as argparse does).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megarlhf.config import ConfigError, ModelFileConfig, load_config  # noqa: E402
from megarlhf.config.model import LORA_TARGETS  # noqa: E402
from megarlhf.perf.memory import GIB, ROLES, Plan, PlanError, PlanSpec, plan  # noqa: E402

PROG = "plan.py"


def fail(message: str):
    """A bad input: one line naming the flag, exit 2 (argparse's status, without the usage)."""
    print(f"{PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def parse_args(argv=None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    a = p.add_argument
    a("--model", required=True, help="preset name in configs/models/ or a YAML path")
    a("overrides", nargs="*", help="model.key=value overrides of the preset")
    a("--nodes", type=int, default=1)
    a("--gpus-per-node", type=int, default=8)
    a("--gpu-mem", type=float, default=80.0, help="GiB per GPU")
    a("--tp", type=int, default=1)
    a("--pp", type=int, default=1)
    a("--dp", type=int, default=None, help="default: world / (tp * pp)")
    a("--zero", type=int, default=1, help="ZeRO stage 0-3 of actor and critic")
    a("--dtype", default="bf16", help="bf16 (fp32 master + Adam: 16 B/param) or fp32")
    rec = p.add_mutually_exclusive_group()
    rec.add_argument("--recompute", dest="recompute", action="store_true", default=None)
    rec.add_argument("--no-recompute", dest="recompute", action="store_false")
    a("--micro-batch", type=int, default=1, help="rows per micro-batch")
    a("--prompt-len", type=int, default=512)
    a("--response-len", type=int, default=512)
    a("--rollout-batch", type=int, default=64, help="prompts per PPO step (all ranks)")
    a("--samples-per-prompt", type=int, default=1)
    a("--num-minibatches", type=int, default=1)
    a("--ppo-epochs", type=int, default=1)
    a("--gen-tp", type=int, default=0, help="generation TP (0: tp * pp, as ppo.generation_tp)")
    a(
        "--colocate",
        default=",".join(ROLES),
        help="roles on these GPUs, comma-separated (default: all four)",
    )
    a("--offload-frozen", action="store_true", help="reference / reward in CPU memory between uses")
    a("--no-critic", action="store_true", help="RLOO / GRPO: no critic")
    a("--no-reward-model", action="store_true", help="a rule reward_fn: no reward model")
    a("--optimizer", default="fused", help="fused (DeepSpeed FusedAdam) or torch (AdamW)")
    a("--lora-rank", type=int, default=0, help="LoRA rank of actor and critic (0: full)")
    a(
        "--lora-targets",
        default=",".join(LORA_TARGETS),
        help="linears with adapters, comma-separated (default: all of qkv,proj,fc1,fc2)",
    )
    a("--reserve", type=float, default=None, help="GiB kept free (default: 10%% of --gpu-mem)")
    a("--mfu", type=float, default=0.4, help="model FLOPs utilization of the training passes")
    a("--gen-mfu", type=float, default=None, help="MFU of generation (default: --mfu)")
    a("--peak-tflops", type=float, default=989.0, help="per GPU (H100 SXM dense bf16: 989)")
    a("--json", action="store_true", help="print one JSON object instead of the tables")
    return p, p.parse_args(argv)


def load_model(name: str, overrides: list[str]):
    path = Path(name)
    if path.suffix not in (".yaml", ".yml"):
        path = ROOT / "configs" / "models" / f"{name}.yaml"
        if not path.exists():
            presets = sorted(q.stem for q in (ROOT / "configs" / "models").glob("*.yaml"))
            fail(f"--model: no preset {name!r} (presets: {', '.join(presets)})")
    bad = [o for o in overrides if not o.startswith("model.")]
    if bad:
        fail(f"overrides: only model.key=value is accepted, got {' '.join(bad)}")
    try:
        return load_config(ModelFileConfig, path, overrides).model
    except ConfigError as e:
        fail(f"--model: {e}")


def build_spec(args: argparse.Namespace) -> PlanSpec:
    model = load_model(args.model, args.overrides)
    world = args.nodes * args.gpus_per_node
    dp = args.dp
    if dp is None:
        if args.tp < 1 or args.pp < 1 or world % (args.tp * args.pp):
            fail(
                f"--tp/--pp: tp * pp = {args.tp} * {args.pp} does not divide the world size "
                f"--nodes * --gpus-per-node = {world}"
            )
        dp = world // (args.tp * args.pp)
    colocate = tuple(r.strip() for r in args.colocate.split(",") if r.strip())
    fields = dict(
        model=model,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        gpu_mem=args.gpu_mem,
        tp=args.tp,
        pp=args.pp,
        dp=dp,
        zero=args.zero,
        dtype=args.dtype,
        recompute=model.activation_recompute if args.recompute is None else args.recompute,
        micro_batch=args.micro_batch,
        prompt_len=args.prompt_len,
        response_len=args.response_len,
        rollout_batch=args.rollout_batch,
        samples_per_prompt=args.samples_per_prompt,
        num_minibatches=args.num_minibatches,
        ppo_epochs=args.ppo_epochs,
        gen_tp=args.gen_tp,
        colocate=colocate,
        critic=not args.no_critic,
        reward_model=not args.no_reward_model,
        offload_frozen=args.offload_frozen,
        optimizer=args.optimizer,
        lora_rank=args.lora_rank,
        lora_targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()),
        reserve=args.reserve,
        mfu=args.mfu,
        gen_mfu=args.gen_mfu,
        peak_tflops=args.peak_tflops,
    )
    try:
        return PlanSpec(**fields)
    except PlanError as e:
        fail(flag_message(e))


def flag_message(e: PlanError) -> str:
    """'--gen-tp: why' from a PlanError on field gen_tp."""
    return f"--{e.field.replace('_', '-')}: {str(e).split(': ', 1)[-1]}"


def _g(x: float) -> str:
    return f"{x / GIB:8.2f}"


def render(result: Plan) -> str:
    s = result.spec
    m = s["model"]
    lines = [
        f"model {m['family']} h={m['hidden_size']} layers={m['num_layers']} "
        f"heads={m['num_heads']}/{m['num_kv_heads']} vocab={m['vocab_size']} "
        f"dtype={s['dtype']} recompute={s['recompute']}",
        f"layout {s['nodes']} x {s['gpus_per_node']} GPUs of {s['gpu_mem']:g} GiB: "
        f"tp={s['tp']} pp={s['pp']} dp={s['dp']} zero={s['zero']} gen_tp={s['gen_tp']}; "
        f"micro-batch {s['micro_batch']}, prompt {s['prompt_len']} + response "
        f"{s['response_len']}, rollout {s['rollout_batch']} x {s['samples_per_prompt']}",
        "",
        "per GPU (GiB)      params/GPU  weights    grads  master+Adam  activ.   logits  KV cache",
    ]
    for role, r in result.roles.items():
        where = "" if r.colocated else "  (elsewhere)"
        n = result.params_per_gpu[role]
        lines.append(
            f"  {role:<10} {n / 1e9:9.3f}B {_g(r.weights)} {_g(r.grads)}     "
            f"{_g(r.master + r.optimizer)} {_g(r.activations)} {_g(r.logits)} "
            f"{_g(r.kv_cache)}{where}"
        )
    if s["lora_rank"]:
        lines.append(
            "  trained params/GPU (LoRA): "
            + ", ".join(f"{k} {v / 1e6:.3f}M" for k, v in result.trainable_per_gpu.items())
        )
    g = result.generation
    lines += [
        "",
        f"rollout: generation copy {_g(g['copy_weights']).strip()} GiB, KV cache "
        f"{_g(g['kv_cache']).strip()} GiB for {g['rows_per_rank']} rows, prefill working set "
        f"{_g(g['prefill_working_set']).strip()} GiB, ZeRO-3 gather "
        f"{_g(g['zero3_gather']).strip()} GiB",
        "",
        "phase peaks (GiB): " + ", ".join(f"{k} {_g(v).strip()}" for k, v in result.phases.items()),
        f"peak {_g(result.peak).strip()} GiB ({result.peak_phase}) + reserve "
        f"{_g(result.reserve).strip()} GiB of {_g(result.capacity).strip()} GiB: "
        + ("FITS" if result.fits else "DOES NOT FIT"),
        f"step time {result.step_time_s:.1f} s at MFU {s['mfu']:g} "
        f"(generation {s['gen_mfu'] or s['mfu']:g}), {s['peak_tflops']:g} TFLOP/s per GPU; "
        f"{result.flops['total'] / 1e15:.1f} PFLOP per step",
    ]
    lines += [f"note: {n}" for n in result.notes]
    return "\n".join(lines)


def main(argv=None) -> int:
    _, args = parse_args(argv)
    spec = build_spec(args)
    try:
        result = plan(spec)
    except PlanError as e:
        fail(flag_message(e))
    if args.json:
        print(json.dumps(result.to_dict(), indent=1))
    else:
        print(render(result))
    return 0 if result.fits else 1


if __name__ == "__main__":
    sys.exit(main())
