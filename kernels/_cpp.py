"""Just-in-time build of the C++ CPU ops in `megarlhf/csrc` (torch.utils.cpp_extension.load).

The ops register under `torch.ops.megarlhf` (`logprobs_fwd`, `logprobs_bwd`, `gae`). They are built
on first use into $TORCH_EXTENSIONS_DIR (the Makefile points it at `.torch_extensions/`; torch's
default is ~/.cache/torch_extensions) and loaded from there afterwards. torch rebuilds by itself
when a source or flag changes; the extension name also carries a hash of this machine's CPU flags
because it is compiled with -march=native.

When no compiler or ninja is present, the build fails, or MEGARLHF_NO_CPP=1 is set, the ops are
simply unavailable: `cpu_ops_status()` says why and the dispatcher falls back to pure torch.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil

import torch

logger = logging.getLogger(__name__)

_SOURCES = ("logprobs.cpp", "gae.cpp")
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-DNDEBUG"]


def _csrc_dir() -> str:
    from megarlhf import csrc

    return os.path.dirname(os.path.abspath(csrc.__file__))


def _cpu_tag() -> str:
    """Short hash of the CPU model and flags (a -march=native build is only valid on this CPU)."""
    info = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            info += "".join(ln for ln in f if ln.startswith(("flags", "model name")))
    except OSError:
        pass
    return hashlib.sha1(info.encode()).hexdigest()[:8]


def _ops_registered() -> bool:
    return hasattr(torch.ops.megarlhf, "logprobs_fwd") and hasattr(torch.ops.megarlhf, "gae")


@functools.cache
def cpu_ops_status() -> tuple[bool, str]:
    """Build (once per process) and load the CPU ops; return (available, why / where from)."""
    if os.environ.get("MEGARLHF_NO_CPP", "0") not in ("", "0"):
        return False, "disabled by MEGARLHF_NO_CPP"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return False, f"no C++ compiler ({cxx!r} not on PATH)"
    try:
        from torch.utils.cpp_extension import load, verify_ninja_availability

        verify_ninja_availability()
    except Exception as e:  # noqa: BLE001 - any failure means "fall back", with the reason
        return False, f"ninja unavailable: {e}"
    src = _csrc_dir()
    sources = [os.path.join(src, s) for s in _SOURCES]
    missing = [s for s in sources if not os.path.exists(s)]
    if missing:
        return False, f"C++ sources missing: {missing}"
    name = f"megarlhf_cpu_ops_{_cpu_tag()}"
    try:
        logger.info("building C++ CPU ops %s (first use; cached afterwards)", name)
        path = load(
            name=name,
            sources=sources,
            extra_cflags=_CFLAGS,
            extra_ldflags=["-fopenmp"],
            extra_include_paths=[src],
            is_python_module=False,
            verbose=False,
        )
    except Exception as e:  # noqa: BLE001
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        return False, f"C++ build failed: {lines[-1] if lines else type(e).__name__}"
    if not _ops_registered():
        return False, f"built {path} but torch.ops.megarlhf lacks the ops"
    return True, f"built with {cxx} {' '.join(_CFLAGS)} (JIT, cached under {os.path.dirname(path)})"


def cpu_ops_available() -> bool:
    return cpu_ops_status()[0]
