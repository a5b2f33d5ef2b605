"""`python -m megarlhf.report`: which kernel backends run on this machine and why the others do
not (in the spirit of DeepSpeed's ds_report).

Building the C++ ops is part of checking them, so the first run on a machine may take ~20 s.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys

import torch


def _compiler() -> str:
    cxx = os.environ.get("CXX", "c++")
    path = shutil.which(cxx)
    return f"{cxx} -> {path}" if path else f"{cxx} not found"


def report_lines() -> list[str]:
    """The report, one line per entry."""
    from megarlhf.kernels._dispatch import backend_status, select_backend

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    lines = [
        "megarlhf kernel report",
        "-" * 72,
        f"python ............ {sys.version.split()[0]} ({platform.machine()})",
        f"torch ............. {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})",
        f"CUDA device ....... {gpu}",
        f"CPU threads ....... {torch.get_num_threads()}",
        f"C++ compiler ...... {_compiler()}",
        f"TORCH_EXTENSIONS_DIR {os.environ.get('TORCH_EXTENSIONS_DIR', '(torch default)')}",
        f"TRITON_INTERPRET .. {os.environ.get('TRITON_INTERPRET', '0')}",
        "-" * 72,
        f"{'backend':<8} {'status':<10} {'devices':<10} detail",
    ]
    for st in backend_status():
        status = "OK" if st.available else "missing"
        devices = ",".join(st.devices) or "-"
        lines.append(f"{st.name:<8} {status:<10} {devices:<10} {st.detail}")
    lines.append("-" * 72)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        lines.append(f"ops on {dev} tensors use: {select_backend(torch.device(dev))}")
    return lines


def main() -> None:
    print("\n".join(report_lines()))


if __name__ == "__main__":
    main()
