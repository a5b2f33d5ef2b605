"""Reading data files into rows, each named by where it came from, and the skip-invalid loop the
SFT, RM and PPO-prompt loaders share.

The storage format follows from the path:

* a folder: a `datasets` `save_to_disk` folder (`datasets.load_from_disk`; of a `DatasetDict`,
  its `train` split or its only one); rows are named `folder row i` (0-based);
* `*.parquet`, `*.arrow`: read by `datasets` (streamed, so nothing is copied into its cache);
  rows `file row i`. A column that is null in a row counts as absent from that row (a columnar
  file cannot tell the two apart);
* `*.json`: a JSON array of rows (rows `file row i`), or JSON lines like `*.jsonl`;
* anything else: JSON lines, one row per line, rows named `file:line`.

JSON lines: the file is UTF-8; lines are split on "\\n" only (U+2028, U+0085, form feeds are
characters inside a row, as JSON has them; a "\\r" before the "\\n" is JSON whitespace); a UTF-8
byte-order mark at the start of the file is skipped; blank lines are not rows. Bad UTF-8, bad
JSON and JSON nested too deeply for the parser are errors of their line (skippable), never a
traceback. A `.json` array that is not valid JSON cannot be read past the error, so that error
stops the load even with skip_invalid.

Why not `datasets` for JSON too: its JSON reader goes through Arrow, which unifies types across
rows (one row of another type fails the whole file, a missing key reads as null) and reports no
line; the `json` module gives every row its own checks and its line.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megarlhf.data.errors import DataError, Invalid

BOM = b"\xef\xbb\xbf"
# Suffixes read through `datasets` (with the builder that reads them); folders are too.
DATASETS_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow"}


# ----------------------------------------------------------------------------- lines and JSON


def read_bytes(path: str) -> bytes:
    """The file's bytes without a leading UTF-8 byte-order mark; DataError if unreadable."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataError(path, "unreadable", f"cannot read data file ({e.strerror})") from None
    return data[len(BOM) :] if data.startswith(BOM) else data


def split_lines(data: bytes) -> list[tuple[int, bytes]]:
    """(1-based line number, line) of every non-blank line, split on b"\\n" only."""
    return [(n, line) for n, line in enumerate(data.split(b"\n"), 1) if line.strip()]


def decode_utf8(line: bytes) -> str:
    """The line as text, or Invalid("not_utf8") naming the first bad byte (0-based)."""
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Invalid("not_utf8", f"not valid UTF-8 (byte {e.start})") from None


def parse_json(text: str) -> Any:
    """The JSON value of `text`, or Invalid("malformed_json") (also for too deep nesting)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise Invalid("malformed_json", f"malformed JSON: {e.msg} (column {e.colno})") from None
    except RecursionError:  # e.g. "[" * 200_000: the parser recurses once per level
        raise Invalid("malformed_json", "malformed JSON (nested too deeply)") from None


# ----------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class SourceRow:
    """One row of a data file: where it is, and either its JSON line (parsed by `value()`, so a
    bad line is an error of that row) or the value already read."""

    where: str
    line: bytes | None = None
    parsed: Any = None

    def value(self) -> Any:
        """The row's value; Invalid if its line is not UTF-8 JSON."""
        if self.line is None:
            return self.parsed
        return parse_json(decode_utf8(self.line))


def iter_rows(path: str) -> Iterator[SourceRow]:
    """The rows of one data file or folder, in order (the module docstring says how)."""
    p = Path(path)
    if p.is_dir() or p.suffix.lower() in DATASETS_SUFFIXES:
        yield from _datasets_rows(path)
        return
    data = read_bytes(path)
    if p.suffix.lower() == ".json" and data.lstrip()[:1] == b"[":
        yield from _json_array_rows(path, data)
        return
    for n, line in split_lines(data):
        yield SourceRow(f"{path}:{n}", line=line)


def _json_array_rows(path: str, data: bytes) -> Iterator[SourceRow]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line_no, line_start = data.count(b"\n", 0, e.start) + 1, data.rfind(b"\n", 0, e.start) + 1
        msg = f"not valid UTF-8 (byte {e.start - line_start})"
        raise DataError(f"{path}:{line_no}", "not_utf8", msg) from None
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        msg = f"malformed JSON: {e.msg} (column {e.colno})"
        raise DataError(f"{path}:{e.lineno}", "malformed_json", msg) from None
    except RecursionError:
        raise DataError(path, "malformed_json", "malformed JSON (nested too deeply)") from None
    for i, row in enumerate(rows):
        yield SourceRow(f"{path} row {i}", parsed=row)


def _datasets_rows(path: str) -> Iterator[SourceRow]:
    """Rows of a save_to_disk folder, Parquet or Arrow file, read by `datasets` (imported here:
    it takes a second to import, which JSON-only runs do not pay)."""
    import datasets

    if not Path(path).exists():
        raise DataError(path, "unreadable", "cannot read data file (No such file or directory)")
    try:
        if Path(path).is_dir():
            table, name = _load_from_disk(datasets, path)
        else:
            kind = DATASETS_SUFFIXES[Path(path).suffix.lower()]
            table = datasets.load_dataset(kind, data_files=str(Path(path).resolve()), split="train",
                                          streaming=True)  # fmt: skip
            name = path
        for i, row in enumerate(table):
            present = {k: v for k, v in row.items() if v is not None}
            yield SourceRow(f"{name} row {i}", parsed=present)
    except DataError:
        raise
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as e:
        raise DataError(path, "unreadable", f"cannot read data file ({e})") from None


def _load_from_disk(datasets, path: str):
    """(dataset, name of its rows) of a save_to_disk folder: a Dataset, or one DatasetDict split
    (`train`, or the only one)."""
    ds = datasets.load_from_disk(path)
    if not isinstance(ds, datasets.DatasetDict):
        return ds, path
    splits = list(ds)
    split = "train" if "train" in ds else splits[0] if len(splits) == 1 else None
    if split is None:
        raise DataError(
            path, "unreadable", f"holds splits {splits} and none is 'train': name the split's "
            f"folder (e.g. {Path(path) / splits[0]})",
        )  # fmt: skip
    return ds[split], str(Path(path) / split)


# ----------------------------------------------------------------------------- the loop


@dataclass
class Loaded:
    """Items made from the rows of some files, and what was skipped (only with skip_invalid)."""

    items: list
    # Rows skipped per reason (e.g. {"too_long": 2}), in the order the reasons first occurred.
    skipped: dict[str, int] = field(default_factory=dict)
    # The first skipped row's full message per reason.
    first_skipped: dict[str, str] = field(default_factory=dict)

    def add_skipped(self, reason: str, n: int, first: str) -> None:
        """Count `n` more skipped rows of `reason` (`first`: the first one's message)."""
        self.skipped[reason] = self.skipped.get(reason, 0) + n
        self.first_skipped.setdefault(reason, first)


def load_rows(
    paths: Sequence[str],
    make: Callable[[Any, str], Any],
    *,
    skip_invalid: bool,
    logger: logging.Logger,
    what: str,
) -> Loaded:
    """`make(row value, where)` of every row of the files, in order.

    A row for which `make` (or reading its line) raises Invalid is a DataError naming its file and
    line or row; with `skip_invalid` it is counted instead, and `logger` warns once per file and
    reason (count and first offending row) and once with the total (`what`: "SFT data", ...).
    """
    out = Loaded([])
    for path in paths:
        in_file = Loaded([])
        for row in iter_rows(path):
            try:
                out.items.append(make(row.value(), row.where))
            except Invalid as e:
                err = DataError(row.where, e.reason, str(e))
                if not skip_invalid:
                    raise err from None
                in_file.add_skipped(e.reason, 1, str(err))
        for reason, n in in_file.skipped.items():
            first = in_file.first_skipped[reason]
            logger.warning("%s: skipped %d invalid row(s) (%s), first: %s", path, n, reason, first)
            out.add_skipped(reason, n, first)
    if out.skipped:
        logger.warning(
            "%s: kept %d samples, skipped %d invalid rows: %s",
            what,
            len(out.items),
            sum(out.skipped.values()),
            ", ".join(f"{k}={v}" for k, v in sorted(out.skipped.items())),
        )
    return out
