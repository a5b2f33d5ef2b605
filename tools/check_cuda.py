"""The CUDA check: what a GPU machine can verify that this CPU-only project cannot, in one run.

    python tools/check_cuda.py            # about 5 minutes on one GPU; prints one JSON line
    python tools/check_cuda.py --quick    # kernels and generation only

Sections (each reports pass / fail / skipped with the reason, and its numbers):
  device      the GPU, torch / triton / transformers versions, flash-attn, DeepSpeed available
  kernels     the CUDA-path tests: compiled Triton kernels (log-probs, KL, GAE) against their
              pure-torch references (pytest tests/kernels, natively on CUDA)
  model       our GPT's logits on CUDA (fp32, bf16; SDPA / flash-attn) against the same model on
              the CPU in fp32
  generate    greedy generation at SmolLM2-135M dims, batch 8, 64 new tokens, bf16: ours against
              transformers' generate on the same weights (tokens/s ratio, tokens equal)
  ppo         one bf16 PPO iteration of the benchmark at SmolLM2 dims (batch 8, prompt 64,
              response 32); needs DeepSpeed, which the project's GPU machine does not have
              (it reaches no package registry): then skipped, and the JSON says so

Without a CUDA device it prints {"cuda": false, "reason": "no CUDA device"} and exits 0. Exit
status: 0 when every section that ran passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _have(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def device_info() -> dict:
    import torch

    info = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "bf16": torch.cuda.is_bf16_supported(),
        "flash_attn": _have("flash_attn"),
        "deepspeed": _have("deepspeed"),
    }
    for mod in ("triton", "transformers"):
        info[mod] = __import__(mod).__version__ if _have(mod) else None
    return info


def check_kernels(timeout: int) -> dict:
    """The kernel tests (Triton compiled on CUDA) in a subprocess; their summary line."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kernels"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    tail = proc.stdout.strip().splitlines()[-1:] or [""]
    return {
        "status": "pass" if proc.returncode == 0 else "fail",
        "summary": tail[0],
        "seconds": round(time.perf_counter() - t0, 1),
        "stderr_tail": proc.stderr[-1500:] if proc.returncode else "",
    }


def _smollm2_config(dtype: str):
    import dataclasses

    from megarlhf.config import ModelFileConfig, load_config

    cfg = load_config(ModelFileConfig, ROOT / "configs/models/smollm2_135m.yaml").model
    return dataclasses.replace(cfg, dtype=dtype, max_seq_len=256)


def check_model() -> dict:
    """Logits on CUDA against the CPU fp32 model (same weights), fp32 and bf16."""
    import torch

    from megarlhf.model.gpt import GPTModel
    from megarlhf.parallel.state import single_process_state

    ps = single_process_state()
    cfg = _smollm2_config("fp32")
    cpu = GPTModel(cfg, ps, seed=1).eval()
    ids = torch.randint(4, cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    out = {}
    with torch.no_grad():
        ref = cpu(ids).float()
        for dtype, tol in (("fp32", 1e-3), ("bf16", 0.15)):
            import dataclasses

            gpu = GPTModel(dataclasses.replace(cfg, dtype=dtype), ps, skip_init=True).cuda()
            gpu.load_state_dict(cpu.state_dict())
            got = gpu(ids.cuda()).float().cpu()
            err = (got - ref).abs().max().item() / max(ref.abs().max().item(), 1e-9)
            out[f"{dtype}_max_rel_err"] = err
            out[f"{dtype}_ok"] = err <= tol
    out["status"] = "pass" if out["fp32_ok"] and out["bf16_ok"] else "fail"
    return out


def check_generate(iters: int = 2) -> dict:
    """Ours against transformers' generate, bf16 on CUDA, greedy, same weights."""
    import torch

    from megarlhf.config import GenerationConfig
    from megarlhf.model.generation import generate
    from megarlhf.model.gpt import GPTModel
    from megarlhf.parallel.state import single_process_state
    from megarlhf.perf.bench import to_hf_causal_lm

    cfg = _smollm2_config("bf16")
    ours = GPTModel(cfg, single_process_state(), seed=1).eval().cuda()
    with tempfile.TemporaryDirectory() as work:
        hf = to_hf_causal_lm(ours.cpu(), work, dtype=torch.bfloat16).cuda()
    ours.cuda()
    ids = torch.randint(4, cfg.vocab_size, (8, 64), generator=torch.Generator().manual_seed(0))
    ids, mask = ids.cuda(), torch.ones_like(ids).cuda()
    gen = GenerationConfig(max_new_tokens=64, temperature=0.0)

    def timed(fn):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t0, out

    def run_ours():
        return generate(ours, ids, mask, gen, None, 0).responses

    @torch.inference_mode()
    def run_hf():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=64,
                          min_new_tokens=64, do_sample=False, pad_token_id=0)  # fmt: skip
        return out[:, ids.shape[1] :]

    run_ours(), run_hf()  # warm-up
    t_ours, t_hf, same = [], [], []
    for _ in range(iters):
        t, a = timed(run_ours)
        t_ours.append(t)
        t, b = timed(run_hf)
        t_hf.append(t)
        same.append(float((a == b).float().mean()))
    ratio = min(t_hf) / min(t_ours)
    return {
        "status": "pass",
        "ours_tokens_per_s": 8 * 64 / min(t_ours),
        "hf_tokens_per_s": 8 * 64 / min(t_hf),
        "hf_generate_ratio": ratio,
        "greedy_token_agreement": min(same),  # bf16: kernels round differently; 1.0 in fp32
    }


def check_ppo(timeout: int) -> dict:
    """One bf16 PPO iteration of the benchmark at SmolLM2 dims (needs DeepSpeed)."""
    if not _have("deepspeed"):
        return {"status": "skipped", "reason": "deepspeed is not installed on this machine"}
    with tempfile.TemporaryDirectory() as work:
        out = Path(work) / "bench.json"
        cmd = [sys.executable, str(ROOT / "tools/bench_throughput.py"), "--model", "smollm2_135m",
               "--batch", "8", "--prompt-len", "64", "--response-len", "32", "--iters", "1",
               "--warmup", "1", "--dtype", "bf16", "--json", str(out)]  # fmt: skip
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            return {"status": "fail", "stderr_tail": proc.stderr[-1500:]}
        rep = json.loads(out.read_text())
    keys = ("e2e_latency_s", "samples_per_s", "train_mfu", "generate_mfu", "peak_tflops")
    return {"status": "pass", **{k: rep[k] for k in keys}}


def run(quick: bool) -> dict:
    result: dict = {"cuda": True, "device": device_info()}
    sections = [("kernels", lambda: check_kernels(240)), ("model", check_model),
                ("generate", check_generate)]  # fmt: skip
    if not quick:
        sections.append(("ppo", lambda: check_ppo(300)))
    for name, fn in sections:
        t0 = time.perf_counter()
        try:
            result[name] = fn()
        except Exception as e:  # noqa: BLE001 - a section's failure is data for the report
            result[name] = {"status": "fail", "error": f"{type(e).__name__}: {e}",
                            "traceback": traceback.format_exc()[-1500:]}  # fmt: skip
        result[name].setdefault("seconds", round(time.perf_counter() - t0, 1))
    result["ok"] = all(result[n]["status"] != "fail" for n, _ in sections)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="kernels, model and generation only")
    args = p.parse_args(argv)
    try:
        import torch
    except ImportError:
        print(json.dumps({"cuda": False, "reason": "torch is not installed"}))
        return 0
    if not torch.cuda.is_available():
        print(json.dumps({"cuda": False, "reason": "no CUDA device"}))
        return 0
    result = run(args.quick)
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
