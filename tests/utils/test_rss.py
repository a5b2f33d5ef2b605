"""Peak RSS of this process image, not of the process that started it."""

import subprocess
import sys

import torch

CHILD = "from megarlhf.utils.rss import peak_rss_bytes; print(peak_rss_bytes())"


def test_current_and_peak_follow_allocations():
    # In a fresh process: a long-lived one (pytest) may serve the tensor from memory it already
    # holds, and its RSS would not move. A 96 MiB tensor is its own mmap, returned to the system
    # when freed: the current RSS falls back, the high-water mark keeps it.
    code = (
        "import torch; from megarlhf.utils.rss import peak_rss_bytes, rss_bytes; "
        "before = rss_bytes(); x = torch.ones(96 * 2**20 // 4); held = rss_bytes(); del x; "
        "after = rss_bytes(); print(held - before, after - before, peak_rss_bytes() - before)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    grew, kept, peak = map(int, out.stdout.split())
    assert grew >= 80 * 2**20  # 96 MiB, touched
    assert kept < 16 * 2**20  # freed: the current RSS is back
    assert peak >= 80 * 2**20  # the peak still holds it


def test_child_does_not_inherit_the_parent_peak():
    big = torch.ones(400 * 2**20 // 4)  # the parent holds 400 MiB when it forks
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True)
    child = int(out.stdout)
    # A bare interpreter with this module is tens of MiB; ru_maxrss would report > 400 MiB here.
    assert child < 200 * 2**20 < big.numel() * 4
