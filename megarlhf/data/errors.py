"""The two errors of the data loaders: a bad row as the loaders report it (`DataError`, naming
file and line or row) and a bad row as a check finds it (`Invalid`, before the loader knows
where it is)."""

from __future__ import annotations


class DataError(ValueError):
    """A bad data row or file. `where` is "file:line", "file row i" or the file; `reason` a short
    key (the skip counts' key with data.skip_invalid)."""

    def __init__(self, where: str, reason: str, message: str):
        super().__init__(f"{where}: {message}")
        self.where = where
        self.reason = reason


class Invalid(Exception):
    """A row fails a check: `reason` (a short key) and the message; the loader adds where.

    Deliberately not a ValueError, so that wrapping a tokenizer's ValueError never swallows it.
    """

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
