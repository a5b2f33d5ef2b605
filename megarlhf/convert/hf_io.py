"""Reading and writing the weights of a Hugging Face model folder, one tensor at a time.

Reads `model.safetensors`, sharded safetensors (`model.safetensors.index.json`), and the legacy
`pytorch_model.bin` (sharded or not; loaded memory-mapped). Writes safetensors through the streaming
writer, split into several files with an index when larger than `max_shard_bytes`, as
`save_pretrained` does. Tokenizer and generation files are copied as they are.
"""

from __future__ import annotations

import json
import shutil
from contextlib import ExitStack
from pathlib import Path

import torch

from megarlhf.checkpoint.safetensors_io import SafetensorsFile, SafetensorsStreamWriter
from megarlhf.convert.hf_config import ConversionError

SAFE_INDEX, SAFE_SINGLE = "model.safetensors.index.json", "model.safetensors"
BIN_INDEX, BIN_SINGLE = "pytorch_model.bin.index.json", "pytorch_model.bin"
# Files of a model folder that describe text processing, not weights: copied on import and export.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def read_hf_config(hf_dir: str | Path) -> dict:
    path = Path(hf_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConversionError(
            f"{path}: not found; {hf_dir} is not a Hugging Face model folder"
        ) from None
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: invalid JSON ({e})") from None


class HFWeights:
    """The tensors of an HF folder, by name, read lazily (use as a context manager)."""

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        self._stack = ExitStack()
        self._file_of: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        try:
            self._index()
        except BaseException:
            self._stack.close()
            raise

    def __enter__(self) -> HFWeights:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        self._handles.clear()

    def _index(self) -> None:
        for index_name, single in ((SAFE_INDEX, SAFE_SINGLE), (BIN_INDEX, BIN_SINGLE)):
            index = self.dir / index_name
            if index.exists():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError) as e:
                    raise ConversionError(f"{index}: not a weight index ({e!r})") from None
                files = sorted({self.dir / f for f in weight_map.values()})
            elif (self.dir / single).exists():
                files = [self.dir / single]
            else:
                continue
            for f in files:
                for name in self._open(f):
                    self._file_of[name] = f
            return
        raise ConversionError(
            f"{self.dir}: no weights found (looked for {SAFE_INDEX}, {SAFE_SINGLE}, {BIN_INDEX}, "
            f"{BIN_SINGLE})"
        )

    def _open(self, path: Path) -> list[str]:
        if not path.exists():
            raise ConversionError(f"{path}: listed in the weight index but missing")
        if path.suffix == ".safetensors":
            handle = self._stack.enter_context(SafetensorsFile(path))
            self._handles[path] = handle
            return list(handle.keys())
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # torch raises several types for a damaged zip/pickle
            raise ConversionError(
                f"{path}: unreadable PyTorch file, truncated or corrupt ({e})"
            ) from None
        self._handles[path] = state
        return list(state)

    def names(self) -> set[str]:
        return set(self._file_of)

    def file_of(self, name: str) -> Path:
        return self._file_of[name]

    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """(shape, dtype) of a tensor, without reading its data for safetensors files."""
        handle = self._handles[self._file_of[name]]
        if isinstance(handle, dict):
            t = handle[name]
            return tuple(t.shape), t.dtype
        return handle.info(name)

    def get(self, name: str) -> torch.Tensor:
        handle = self._handles[self._file_of[name]]
        if isinstance(handle, dict):
            return handle[name]
        return handle.get_tensor(name)


class HFWeightsWriter:
    """Stream tensors into `model.safetensors`, or `model-0000k-of-0000n.safetensors` + index when
    the total exceeds `max_shard_bytes`. Declare every (name -> shape, dtype) up front."""

    def __init__(
        self,
        out_dir: str | Path,
        entries: dict[str, tuple[tuple[int, ...], torch.dtype]],
        max_shard_bytes: int = 5 * 2**30,
    ):
        out_dir = Path(out_dir)
        groups: list[dict] = [{}]
        size = total = 0
        for name, (shape, dtype) in entries.items():
            nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            if groups[-1] and size + nbytes > max_shard_bytes:
                groups.append({})
                size = 0
            groups[-1][name] = (shape, dtype)
            size += nbytes
            total += nbytes
        n = len(groups)
        names = (
            [SAFE_SINGLE]
            if n == 1
            else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        )
        self._writers = {}
        self._writer_of = {}
        for fname, group in zip(names, groups, strict=True):
            w = SafetensorsStreamWriter(out_dir / fname, group, metadata={"format": "pt"})
            self._writers[fname] = w
            self._writer_of.update({name: w for name in group})
        if n > 1:
            weight_map = {name: fname for fname, g in zip(names, groups, strict=True) for name in g}
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (out_dir / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._writer_of[name].write(name, tensor)

    def close(self) -> None:
        for w in self._writers.values():
            w.close()

    def abort(self) -> None:
        for w in self._writers.values():
            w.abort()


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the tokenizer/generation files present in `src` into `dst`; return their names."""
    src, dst = Path(src), Path(dst)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied
