"""Wall-clock seconds of the named stages of one step (`time_<stage>` metrics)."""

from __future__ import annotations

import contextlib
import time


class StageTimer:
    """Accumulates seconds per stage name: `with timer("time_values"): ...`.

    A name timed twice in one step adds up (e.g. one actor update per minibatch).
    """

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0
