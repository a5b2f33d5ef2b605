"""Runs the Triton kernel cases (triton_cases.py) in a fresh interpreter: with TRITON_INTERPRET=1
on a machine without CUDA, natively on one with CUDA.

triton 3.9 reads TRITON_INTERPRET when `@triton.jit` decorates a kernel, i.e. when the kernel
module is imported, so it cannot be switched inside this pytest process (another test may have
imported the modules already); a subprocess gets it right whatever the import order.
"""

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_triton_kernels():
    pytest.importorskip("triton")
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    cases = os.path.join("tests", "kernels", "triton_cases.py")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", cases],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, tail


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_kernels_compile_for_h100():
    """Compile every kernel to an sm_90 cubin (front end, LLVM, bundled ptxas; nothing launched),
    which needs no GPU. The interpreter is lenient where the compiler is not (it accepted a plain
    Python global inside a kernel that the real compiler rejects), so this runs everywhere."""
    triton = pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("kernels are interpreted functions in this process")
    from megarlhf.kernels import gae_triton, logprobs_triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)
    rows = dict(N="i32", T="i32", V="i32", stride_b="i64", stride_t="i64", inv_temp="fp32")
    tiles = dict(BLOCK_N="constexpr", BLOCK_V="constexpr")
    jobs = []
    for dt in ("fp32", "bf16"):
        fwd = dict(x_ptr=f"*{dt}", lab_ptr="*i64", out_ptr="*fp32", **rows)
        fwd.update(WITH_ENTROPY="constexpr", **tiles)
        for ent in (True, False):
            consts = {"WITH_ENTROPY": ent, "BLOCK_N": 1, "BLOCK_V": 4096}
            jobs.append((logprobs_triton._logprobs_fwd_kernel, fwd, consts, 8))
        ptrs = {p: "*fp32" for p in ("lse_ptr", "ent_ptr", "glp_ptr", "gent_ptr")}
        bwd = dict(x_ptr=f"*{dt}", lab_ptr="*i64", **ptrs, grad_ptr=f"*{dt}", **rows, **tiles)
        jobs.append((logprobs_triton._logprobs_bwd_kernel, bwd, {"BLOCK_N": 1, "BLOCK_V": 4096}, 8))
    gae = dict(r_ptr="*fp32", v_ptr="*fp32", m_ptr="*u8", adv_ptr="*fp32", ret_ptr="*fp32")
    gae.update(B="i32", T="i32", gamma="fp32", gamma_lam="fp32", BLOCK_B="constexpr")
    jobs.append((gae_triton._gae_kernel, gae, {"BLOCK_B": 32}, 1))
    for fn, sig, consts, warps in jobs:
        try:
            compiled = triton.compile(
                ASTSource(fn, sig, consts), target=target, options={"num_warps": warps}
            )
        except RuntimeError as e:
            if "ptxas" in str(e) or "backend" in str(e).lower():
                pytest.skip(f"no CUDA toolchain in this triton install: {e}")
            raise
        assert compiled.asm.get("cubin"), fn.__name__
