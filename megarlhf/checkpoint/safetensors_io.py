"""safetensors files read and written one tensor at a time.

The `safetensors` library validates headers (`safe_open`) and writes whole state dicts
(`save_file`, used for a rank's own weights in `model_shards.save_model_shard`). It has no way to
write a file whose tensors arrive one by one, and its reader memory-maps the file, so streaming a
model through it keeps every page it touched resident until close. The two classes here fill those
gaps for the converters and the any-layout loader: peak memory is one tensor, not a model.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from megarlhf.checkpoint.errors import CheckpointError

# safetensors dtype codes <-> torch dtypes (the subset a model checkpoint uses).
ST_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
TORCH_DTYPES: dict[str, torch.dtype] = {v: k for k, v in ST_DTYPES.items()}


class SafetensorsStreamWriter:
    """Write one safetensors file tensor by tensor.

    The header (names, dtypes, shapes, byte offsets) is computed from `entries` and written first;
    each `write` then puts that tensor's bytes at its offset, so only one tensor is in memory at a
    time. `close` checks that every declared tensor was written.
    """

    def __init__(
        self,
        path: str | Path,
        entries: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
        metadata: Mapping[str, str] | None = None,
    ):
        self.path = Path(path)
        self._layout: dict[str, tuple[tuple[int, ...], torch.dtype, int, int]] = {}
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
        offset = 0
        for name, (shape, dtype) in entries.items():
            nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[name] = {
                "dtype": ST_DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            self._layout[name] = (tuple(shape), dtype, offset, nbytes)
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
        self._data_start = 8 + len(blob)
        self._pending = set(self._layout)
        self._file = open(self.path, "wb")
        self._file.write(len(blob).to_bytes(8, "little"))
        self._file.write(blob)
        self._file.truncate(self._data_start + offset)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._layout:
            raise KeyError(f"{self.path}: {name!r} was not declared")
        shape, dtype, offset, nbytes = self._layout[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(
                f"{self.path}: {name} declared {shape} {dtype}, got {tuple(tensor.shape)} "
                f"{tensor.dtype}"
            )
        if name not in self._pending:
            raise ValueError(f"{self.path}: {name} written twice")
        if nbytes:
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            self._file.seek(self._data_start + offset)
            self._file.write(memoryview(data.numpy()))
        self._pending.discard(name)

    def close(self) -> None:
        self._file.close()
        if self._pending:
            raise CheckpointError(
                f"{self.path}: never wrote {len(self._pending)} tensor(s), e.g. "
                f"{sorted(self._pending)[:3]}"
            )

    def abort(self) -> None:
        self._file.close()


class SafetensorsFile:
    """Read a safetensors file tensor by tensor with plain reads (no memory map).

    `safe_open` maps the whole file, and every page it touches stays in the process's resident
    set until the file is closed, so streaming a model through it still peaks at the model's size.
    Here the header is validated by `safe_open` (truncation, offsets, coverage: the reference
    checks and messages) and each tensor is then read with one `readinto` into its own buffer.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with safe_open(str(self.path), framework="pt") as f:
                self._metadata = f.metadata() or {}
        except (SafetensorError, OSError) as e:
            raise CheckpointError(
                f"{self.path}: unreadable safetensors file, truncated or corrupt ({e})"
            ) from None
        self._file = open(self.path, "rb")
        (header_len,) = struct.unpack("<Q", self._file.read(8))
        header = json.loads(self._file.read(header_len))
        header.pop("__metadata__", None)
        self._data_start = 8 + header_len
        self._entries = {
            name: (tuple(e["shape"]), TORCH_DTYPES[e["dtype"]], *e["data_offsets"])
            for name, e in header.items()
        }

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def keys(self) -> list[str]:
        return list(self._entries)

    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """(shape, dtype) of tensor `name`, from the header."""
        shape, dtype, _, _ = self._entry(name)
        return shape, dtype

    def get_tensor(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor `name`, read into `out` (a contiguous tensor of its shape and dtype) if given."""
        shape, dtype, begin, end = self._entry(name)
        if out is None:
            out = torch.empty(shape, dtype=dtype)
        elif tuple(out.shape) != shape or out.dtype != dtype or not out.is_contiguous():
            raise CheckpointError(
                f"{self.path}: {name} is {shape} {dtype}, cannot read into {out.shape}"
            )
        if end > begin:
            self._file.seek(self._data_start + begin)
            got = self._file.readinto(memoryview(out.reshape(-1).view(torch.uint8).numpy()))
            if got != end - begin:
                raise CheckpointError(f"{self.path}: {name}: read {got} of {end - begin} bytes")
        return out

    def _entry(self, name: str):
        if name not in self._entries:
            raise CheckpointError(f"{self.path}: missing tensor {name}")
        return self._entries[name]
