"""Resident memory of this process: now and its high-water mark.

On Linux both come from /proc/self/status (VmRSS, VmHWM). VmHWM belongs to the process's own
address space, so it starts fresh at exec. `getrusage(RUSAGE_SELF).ru_maxrss` does not: Linux
carries it across fork + exec, so a small process started by a large one (a test started by a
pytest process holding a gigabyte) reports its parent's size as its own peak. Elsewhere the
fallback is ru_maxrss (KiB on Linux, bytes on macOS).
"""

from __future__ import annotations

import sys


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """Resident set size now."""
    now = _status_bytes("VmRSS")
    return now if now is not None else peak_rss_bytes()


def peak_rss_bytes() -> int:
    """High-water mark of the resident set size of this process image."""
    peak = _status_bytes("VmHWM")
    if peak is not None:
        return peak
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)
