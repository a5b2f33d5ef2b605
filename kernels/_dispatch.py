"""Which kernel backend runs an op: availability of each backend, and the choice per device.

Backends, fastest first for their device:
  - "triton": Triton kernels, for CUDA tensors. On CPU only through the Triton interpreter
    (TRITON_INTERPRET=1, set before the kernel modules are imported), which the tests use; it is
    never picked automatically for CPU tensors because it is slow.
  - "cpp": C++ (OpenMP) ops from megarlhf/csrc, built just-in-time, for CPU tensors.
  - "torch": pure torch, every device; the fallback when neither of the above is available.

`MEGARLHF_KERNEL_BACKEND=<name>` or a `backend=` argument forces one (an error if it cannot run
on the tensor's device), for tests and benchmarks.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
from megarlhf.kernels._cpp import cpu_ops_status

BACKENDS = ("triton", "cpp", "torch")
_PREFERENCE = {"cuda": ("triton", "torch"), "cpu": ("cpp", "torch")}


@dataclass(frozen=True)
class BackendStatus:
    """Whether one backend can run here, on which device types, and why (not)."""

    name: str
    available: bool
    # Device types ("cpu", "cuda") whose tensors this backend accepts here.
    devices: tuple[str, ...]
    detail: str


@functools.cache
def _triton_version() -> str | None:
    try:
        import triton
    except Exception:  # noqa: BLE001 - a broken install counts as absent
        return None
    return triton.__version__


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_status() -> BackendStatus:
    version = _triton_version()
    if version is None:
        return BackendStatus("triton", False, (), "triton is not installed (pip install triton)")
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name()
        return BackendStatus("triton", True, ("cuda",), f"triton {version} on {gpu}")
    if triton_interpreting():
        detail = f"triton {version} interpreter (TRITON_INTERPRET=1): CPU tensors, slow, for tests"
        return BackendStatus("triton", True, ("cpu",), detail)
    if torch.version.cuda is None:
        why = f"torch {torch.__version__} is a CPU-only build"
    else:
        why = f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU"
    return BackendStatus(
        "triton", False, (), f"triton {version} installed but no CUDA device: {why}"
    )


def _cpp_status() -> BackendStatus:
    ok, detail = cpu_ops_status()
    return BackendStatus("cpp", ok, ("cpu",) if ok else (), detail)


def _torch_status() -> BackendStatus:
    devices = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    return BackendStatus("torch", True, devices, f"pure torch {torch.__version__} (reference path)")


def backend_status() -> list[BackendStatus]:
    """Status of every backend on this machine (builds the C++ ops on first call)."""
    return [_triton_status(), _cpp_status(), _torch_status()]


def _status(name: str) -> BackendStatus:
    if name == "triton":
        return _triton_status()
    if name == "cpp":
        return _cpp_status()
    if name == "torch":
        return _torch_status()
    raise ValueError(f"unknown kernel backend {name!r}; choose one of {BACKENDS}")


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Names of the backends that can run here (on `device`'s type if given), fastest first."""
    dev = None if device is None else torch.device(device).type
    names = _PREFERENCE.get(dev, ("torch",)) if dev is not None else BACKENDS
    out = []
    for name in names:
        st = _status(name)
        if st.available and (dev is None or dev in st.devices):
            out.append(name)
    return out


def select_backend(device: torch.device, requested: str | None = None) -> str:
    """The backend for tensors on `device`: `requested` (or $MEGARLHF_KERNEL_BACKEND) if given and
    able to run there, else the fastest available one."""
    requested = requested or os.environ.get("MEGARLHF_KERNEL_BACKEND") or None
    dev = torch.device(device).type
    if requested is not None:
        st = _status(requested)
        if not (st.available and dev in st.devices):
            raise ValueError(
                f"kernel backend {requested!r} cannot run on {dev} tensors here: {st.detail}"
            )
        return requested
    for name in _PREFERENCE.get(dev, ("torch",)):
        st = _status(name)
        if st.available and dev in st.devices:
            return name
    return "torch"
