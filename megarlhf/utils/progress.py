"""A tqdm progress bar with ETA over optimizer steps, shown only where asked (rank 0)."""

from __future__ import annotations

import sys


class Progress:
    """Step progress bar; a no-op when disabled.

    Args:
        total: optimizer steps of the run.
        initial: steps already done (resume).
        enabled: show the bar (callers pass `rank == 0 and logging.progress_bar`).
    """

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, desc: str = "train"):
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total,
                initial=initial,
                desc=desc,
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
                # Not a terminal (a launcher's pipe): redraw at most every 5 s, not per step.
                mininterval=0.1 if sys.stderr.isatty() else 5.0,
            )

    def update(self, postfix: dict | None = None) -> None:
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(1)

    def write(self, line: str) -> None:
        """Print a line without breaking the bar."""
        if self._bar is not None:
            self._bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
