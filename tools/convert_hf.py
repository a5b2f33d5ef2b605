"""Convert checkpoints between Hugging Face folders and megarlhf's sharded format, and re-shard.

    # HF folder (config.json + safetensors or .bin, sharded or not) -> megarlhf at TP x PP
    python tools/convert_hf.py --hf-to-megarlhf HF_DIR OUT --tp 2 --pp 2
    # megarlhf checkpoint at any TP x PP -> HF folder (from_pretrained loads it), tokenizer copied
    python tools/convert_hf.py --megarlhf-to-hf CKPT OUT
    # megarlhf -> megarlhf at another TP x PP (bit-exact)
    python tools/convert_hf.py --reshard CKPT OUT --tp 1 --pp 1
    # a reward model / critic (scalar head) <-> *ForSequenceClassification (num_labels outputs)
    python tools/convert_hf.py --hf-to-megarlhf HF_RM CKPT --tp 2
    python tools/convert_hf.py --megarlhf-to-hf RM_CKPT OUT --score-bias fold --pad-token-id 0
    # a LoRA checkpoint (adapters only): merged weights as above, or its adapters as a PEFT
    # folder that peft.PeftModel.from_pretrained(HF base, OUT) loads
    python tools/convert_hf.py --megarlhf-to-hf LORA_CKPT OUT
    python tools/convert_hf.py --peft LORA_CKPT OUT --base-model HuggingFaceTB/SmolLM2-135M

One CPU process, streaming tensor by tensor (peak memory is about the largest full tensor, not the
model). Output is staged in a temp folder beside OUT and renamed at the end: an error leaves none.
Families: GPT-2 (model_type gpt2) and LLaMA-style (llama, mistral), language models and sequence
classifiers (the scalar head). The peak RSS is printed last.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from megarlhf.checkpoint.model_shards import CheckpointError
from megarlhf.convert import (
    SCORE_BIAS_POLICIES,
    hf_to_megarlhf,
    megarlhf_to_hf,
    megarlhf_to_peft,
    reshard,
)
from megarlhf.utils.rss import peak_rss_bytes


def parse_size(text: str) -> int:
    """'5GB' / '500MB' / '123' (bytes) -> bytes."""
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40}
    text = text.strip().upper()
    for unit, scale in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * scale)
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--hf-to-megarlhf", nargs=2, metavar=("HF_DIR", "OUT"))
    mode.add_argument("--megarlhf-to-hf", nargs=2, metavar=("CKPT", "OUT"))
    mode.add_argument("--reshard", nargs=2, metavar=("CKPT", "OUT"))
    mode.add_argument(
        "--peft",
        nargs=2,
        metavar=("LORA_CKPT", "OUT"),
        help="a LoRA checkpoint's adapters as a PEFT adapter folder",
    )
    p.add_argument("--tp", type=int, default=1, help="target tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="target pipeline-parallel size")
    p.add_argument(
        "--dtype",
        choices=("fp32", "bf16"),
        help="import: cast to this dtype (default: the checkpoint's; fp16 becomes fp32)",
    )
    p.add_argument(
        "--vocab-divisible-by",
        type=int,
        help="import: model.make_vocab_size_divisible_by (default 128; padded per TP rank)",
    )
    p.add_argument(
        "--max-seq-len",
        type=int,
        help="import (llama): cap model.max_seq_len below max_position_embeddings (KV cache size)",
    )
    p.add_argument(
        "--max-shard-size", default="5GB", help="export: split model.safetensors above this"
    )
    p.add_argument(
        "--score-bias",
        choices=SCORE_BIAS_POLICIES,
        default="error",
        help="export of a scalar head whose bias is not 0 (HF's score layer has none): error "
        "(default), fold (gpt2: into ln_f.bias, same scores), drop (scores shift by -bias; the "
        "bias is kept in config.json and restored on import)",
    )
    p.add_argument(
        "--pad-token-id",
        type=int,
        help="export: set config.json pad_token_id (sequence classifiers need it for batches > 1)",
    )
    p.add_argument(
        "--base-model",
        help="--peft: base_model_name_or_path to record (default: the HF model the base came "
        "from, else the base checkpoint's path)",
    )
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        if args.hf_to_megarlhf:
            overrides = {}
            if args.dtype:
                overrides["dtype"] = args.dtype
            if args.vocab_divisible_by:
                overrides["make_vocab_size_divisible_by"] = args.vocab_divisible_by
            if args.max_seq_len:
                overrides["max_seq_len"] = args.max_seq_len
            src, out = args.hf_to_megarlhf
            cfg = hf_to_megarlhf(
                src, out, tp=args.tp, pp=args.pp, overwrite=args.force, **overrides
            )
            what = f"{cfg.family} model, {cfg.num_layers} layers, tp={args.tp} pp={args.pp}"
        elif args.megarlhf_to_hf:
            src, out = args.megarlhf_to_hf
            hf_cfg = megarlhf_to_hf(
                src,
                out,
                overwrite=args.force,
                max_shard_bytes=parse_size(args.max_shard_size),
                score_bias=args.score_bias,
                pad_token_id=args.pad_token_id,
            )
            what = f"HF {hf_cfg['architectures'][0]} folder"
        elif args.peft:
            src, out = args.peft
            peft_cfg = megarlhf_to_peft(src, out, overwrite=args.force, base_model=args.base_model)
            what = (
                f"PEFT LoRA adapter (r={peft_cfg['r']}, {len(peft_cfg['target_modules'])} modules)"
            )
        else:
            src, out = args.reshard
            cfg = reshard(src, out, tp=args.tp, pp=args.pp, overwrite=args.force)
            what = f"{cfg.family} model re-sharded to tp={args.tp} pp={args.pp}"
    except CheckpointError as e:  # ConversionError included
        print(f"convert_hf: error: {e}", file=sys.stderr)
        return 1
    peak_mib = peak_rss_bytes() / 2**20
    elapsed = time.perf_counter() - start
    print(f"wrote {Path(out)}: {what} in {elapsed:.1f}s; peak RSS {peak_mib:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
