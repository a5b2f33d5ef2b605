"""Benchmark the fused kernels against what they replace, side by side in one run.

    python tools/bench_kernels.py            # B=8, T=512, V=32000 fp32; GAE B=512, T=2048

Log-probs: `logprobs_from_logits` (the backend the dispatcher picks for the device, and the
pure-torch fallback) against the naive `log_softmax(logits.float()).gather(labels)`, both on logits
that require grad (as in training, so the naive path keeps its fp32 log-softmax for backward).
  - time: median of --repeats runs, forward, and forward + backward of the sum.
  - peak memory, "extra" = peak minus what was live before the call (the logits and labels):
      * RSS: each path runs once in a fresh subprocess; /proc/self/clear_refs resets the RSS
        high-water mark after set-up, VmHWM - VmRSS is the extra. Sees every byte (torch, the C++
        op's per-thread buffers, OpenMP stacks). Buffers above glibc's 32 MiB mmap ceiling are
        returned to the OS on free, so the high-water mark is the true peak of the big tensors.
      * allocator: torch.profiler's allocation events (every tensor through c10's CPU allocator),
        replayed in order; the same number for tensors, blind to non-torch buffers.
    `logprob_peak_mem_ratio` is the RSS extra of the fused forward over the naive forward.
GAE: the batched Python reverse loop over time (`gae_ref.gae_loop`, what RLHF codebases run)
against `gae` on the dispatcher's backend, and the vectorized torch scan.

The last line printed is one JSON object with every number. GPU timings cannot be taken here; the
Triton kernels carry their bytes moved and H100 time floors in their top comments.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from megarlhf.kernels import gae, logprobs_from_logits
from megarlhf.kernels._dispatch import select_backend
from megarlhf.kernels.gae_ref import gae_loop

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _inputs(args):
    g = torch.Generator().manual_seed(args.seed)
    shape = (args.batch, args.seq)
    logits = torch.randn(*shape, args.vocab, generator=g).to(DTYPES[args.dtype])
    labels = torch.randint(0, args.vocab, shape, generator=g)
    return logits.requires_grad_(), labels


def _path(name: str):
    """Callable(logits, labels) -> per-token log-probs for path `name`."""
    if name == "naive":
        return lambda x, y: torch.log_softmax(x.float(), -1).gather(-1, y[..., None])[..., 0]
    backend = None if name == "fused" else name.removeprefix("fused-")
    return lambda x, y: logprobs_from_logits(x, y, backend=backend)


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up (loads the C++ op, faults in allocator pages)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _alloc_peak(fn) -> int:
    """Peak bytes allocated through torch's CPU allocator during fn, beyond what was live."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _rss_child(args) -> None:
    """Run one path once in this fresh process; print the RSS high-water mark above set-up."""
    x, y = _inputs(args)
    fn = _path(args.rss_child)
    small_x, small_y = x[:1, :2].detach().clone().requires_grad_(), y[:1, :2]
    fn(small_x, small_y).sum().backward()  # load the op, start OpenMP threads: tiny buffers
    del small_x, small_y
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _status_kb("VmRSS")
    out = fn(x, y)
    fwd = _status_kb("VmHWM") - base
    out.sum().backward()
    both = _status_kb("VmHWM") - base
    print(json.dumps({"fwd": fwd * 1024, "fwd_bwd": both * 1024}))


def _rss_extra(args, path: str) -> dict | None:
    cmd = [sys.executable, os.path.abspath(__file__), "--rss-child", path]
    for key in ("batch", "seq", "vocab", "dtype", "seed", "threads"):
        cmd += [f"--{key}", str(getattr(args, key))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"RSS measurement of {path} failed: {proc.stderr.strip()[-500:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_logprobs(args, results: dict) -> None:
    x, y = _inputs(args)
    logits_bytes = x.numel() * x.element_size()
    auto = select_backend(x.device)
    paths = ["naive", "fused"] + (["fused-torch"] if auto != "torch" else [])
    results.update(logprob_backend=auto, logits_bytes=logits_bytes)
    stats = {}
    for path in paths:
        fn = _path(path)
        fwd = _median_time(lambda fn=fn: fn(x, y), args.repeats)

        def fwd_bwd(fn=fn):
            fn(x, y).sum().backward()
            x.grad = None

        both = _median_time(fwd_bwd, args.repeats)
        alloc_fwd = _alloc_peak(lambda fn=fn: fn(x, y))
        alloc_both = _alloc_peak(fwd_bwd)
        rss = _rss_extra(args, path)
        stats[path] = dict(fwd=fwd, fwd_bwd=both, alloc_fwd=alloc_fwd, alloc_fwd_bwd=alloc_both)
        if rss is not None:
            stats[path].update(rss_fwd=rss["fwd"], rss_fwd_bwd=rss["fwd_bwd"])
        rss_txt = f"{rss['fwd'] / 2**20:8.1f}" if rss else "     n/a"
        print(
            f"{path:12s} fwd {fwd * 1e3:8.1f} ms  fwd+bwd {both * 1e3:8.1f} ms  "
            f"extra peak fwd: RSS {rss_txt} MiB, allocator {alloc_fwd / 2**20:8.1f} MiB  "
            f"(logits {logits_bytes / 2**20:.0f} MiB)"
        )
    naive = stats["naive"]
    for path in paths[1:]:
        s = stats[path]
        tag = "" if path == "fused" else "_" + path.removeprefix("fused-")
        results[f"logprob_time_ratio{tag}"] = s["fwd"] / naive["fwd"]
        results[f"logprob_time_ratio_fwd_bwd{tag}"] = s["fwd_bwd"] / naive["fwd_bwd"]
        results[f"logprob_peak_mem_ratio_alloc{tag}"] = s["alloc_fwd"] / naive["alloc_fwd"]
        results[f"logprob_peak_mem_ratio_alloc_fwd_bwd{tag}"] = (
            s["alloc_fwd_bwd"] / naive["alloc_fwd_bwd"]
        )
        if "rss_fwd" in s and "rss_fwd" in naive:
            results[f"logprob_peak_mem_ratio{tag}"] = s["rss_fwd"] / naive["rss_fwd"]
            results[f"logprob_peak_mem_ratio_fwd_bwd{tag}"] = (
                s["rss_fwd_bwd"] / naive["rss_fwd_bwd"]
            )
        else:  # no /proc (not Linux): fall back to the allocator's view, and say so
            results[f"logprob_peak_mem_ratio{tag}"] = results[f"logprob_peak_mem_ratio_alloc{tag}"]
            results["logprob_peak_mem_method"] = "allocator (RSS unavailable)"
    results.setdefault("logprob_peak_mem_method", "RSS high-water mark, fresh process per path")
    results["logprob_ms"] = {p: round(s["fwd"] * 1e3, 2) for p, s in stats.items()}
    results["logprob_fwd_bwd_ms"] = {p: round(s["fwd_bwd"] * 1e3, 2) for p, s in stats.items()}
    fused_gbs = logits_bytes / stats["fused"]["fwd"] / 1e9
    results["logprob_fused_fwd_read_GBps"] = round(fused_gbs, 2)


def bench_gae(args, results: dict) -> None:
    g = torch.Generator().manual_seed(args.seed + 1)
    shape = (args.gae_batch, args.gae_seq)
    r, v = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    # Response masks: a prompt prefix and right padding of random lengths, plus random holes.
    t = torch.arange(args.gae_seq)
    start = torch.randint(0, args.gae_seq // 4, (args.gae_batch, 1), generator=g)
    end = torch.randint(args.gae_seq // 2, args.gae_seq + 1, (args.gae_batch, 1), generator=g)
    m = (t >= start) & (t < end) & (torch.rand(*shape, generator=g) > 0.05)
    loop = _median_time(lambda: gae_loop(r, v, m, 0.99, 0.95), max(1, args.repeats // 2))
    backend = select_backend(r.device)
    fast = _median_time(lambda: gae(r, v, m, 0.99, 0.95), args.repeats * 4)
    scan = _median_time(lambda: gae(r, v, m, 0.99, 0.95, backend="torch"), args.repeats)
    a_fast, _ = gae(r, v, m, 0.99, 0.95)
    a_loop, _ = gae_loop(r, v, m, 0.99, 0.95)
    err = (a_fast - a_loop).abs().max().item()
    print(
        f"GAE {shape}: python loop {loop * 1e3:.1f} ms, {backend} {fast * 1e3:.2f} ms "
        f"({loop / fast:.0f}x), torch scan {scan * 1e3:.1f} ms ({loop / scan:.1f}x), "
        f"max |diff| {err:.1e}"
    )
    results.update(
        gae_backend=backend,
        gae_speedup=loop / fast,
        gae_speedup_torch_scan=loop / scan,
        gae_ms={"python_loop": round(loop * 1e3, 2), backend: round(fast * 1e3, 3)},
        gae_max_abs_diff=err,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--gae-batch", type=int, default=512)
    p.add_argument("--gae-seq", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.rss_child:
        _rss_child(args)
        return
    results = dict(
        shape=[args.batch, args.seq, args.vocab],
        dtype=args.dtype,
        gae_shape=[args.gae_batch, args.gae_seq],
        threads=args.threads,
        device="cpu",
        torch=torch.__version__,
    )
    bench_logprobs(args, results)
    bench_gae(args, results)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
