"""Sample responses from a megarlhf checkpoint with a KV cache, at any tensor-parallel size.

    python tools/generate.py --checkpoint CKPT --tokenizer TOK --prompt "Hello" [--prompt ...]
    torchrun --nproc_per_node 2 tools/generate.py --checkpoint CKPT --tokenizer TOK --tp 2 ...
    deepspeed --num_gpus 2 tools/generate.py --checkpoint CKPT --tokenizer TOK --tp 2 ...

The checkpoint may have been saved at any TP x PP layout: weights are re-sharded on load to
(tp, pipeline size 1). Ranks beyond one TP group split the prompts data-parallel. Generation
settings are dotted overrides (`generation.temperature=0.7 generation.max_new_tokens=64`). Output
is JSONL (`{"prompt", "response", "tokens", "logprobs"}` per prompt, in input order) on stdout or
--output.

Only ids the tokenizer has are sampled: a model whose vocabulary is larger than the tokenizer's
(padded, or trained with a bigger tokenizer) has its logits cut to the tokenizer's size. A bad
argument, config, prompts file, tokenizer or checkpoint is one line `generate.py: error: ...` and
exit 2; a tokenizer with more ids than the model is refused the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path


def _set_threads() -> None:
    # Launchers do not set OMP_NUM_THREADS; share the cores between the local ranks.
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // local)))


_set_threads()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megarlhf.checkpoint.errors import CheckpointError  # noqa: E402
from megarlhf.checkpoint.model_shards import (  # noqa: E402
    load_model_shard,
    read_meta,
    resolve_checkpoint_dir,
)
from megarlhf.config import ConfigError, GenerationConfig, load_config  # noqa: E402
from megarlhf.data.tokenizer import TEMPLATES, TokenizerError, load_tokenizer  # noqa: E402
from megarlhf.model.generation import generate, left_pad  # noqa: E402
from megarlhf.model.gpt import GPTModel  # noqa: E402
from megarlhf.parallel.state import (  # noqa: E402
    build_parallel_state,
    init_distributed,
    shutdown_distributed,
)

PROG = "generate.py"
# Timeout of every collective (the world and each group): a hung peer fails the run, not hangs it.
DIST_TIMEOUT_S = 600.0


class GenerateError(ValueError):
    """A bad prompts file, output path or model/tokenizer pairing (the message says which)."""


USER_ERRORS = (ConfigError, CheckpointError, TokenizerError, GenerateError)


@dataclass
class GenerateToolConfig:
    """Settings of tools/generate.py that can be overridden with dotted keys."""

    generation: GenerationConfig = field(default_factory=GenerationConfig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="megarlhf checkpoint dir (holds model/), or a training run dir (its latest step)",
    )
    p.add_argument("--tokenizer", required=True, help="sentencepiece model/dir or HF folder")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help='JSONL with {"prompt": ...} per line')
    p.add_argument("--tp", type=int, default=0, help="tensor-parallel size (default: world)")
    p.add_argument("--template", default="auto", choices=TEMPLATES, help="prompt formatting")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    p.add_argument("--config", help="YAML with a generation: section")
    p.add_argument("--output", help="write JSONL here instead of stdout (rank 0)")
    # The deepspeed launcher passes --local_rank; the rank comes from the environment.
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. generation.top_k=40")
    return p.parse_args(argv)


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        try:
            lines = Path(args.prompts_file).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise GenerateError(f"--prompts-file {args.prompts_file}: cannot read it ({e})") from e
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                prompts.append(str(json.loads(line)["prompt"]))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise GenerateError(f"{args.prompts_file}:{lineno}: bad prompt line ({e})") from e
    if not prompts:
        raise GenerateError("no prompts: give --prompt or --prompts-file")
    return prompts


def load_model(args, ps):
    """The checkpoint's model at this layout, and the tokenizer (refused when it has more ids
    than the model has logits)."""
    ckpt = resolve_checkpoint_dir(args.checkpoint)
    cfg = read_meta(ckpt).model
    tok = load_tokenizer(args.tokenizer)
    if tok.vocab_size > cfg.vocab_size:
        raise GenerateError(
            f"--tokenizer {args.tokenizer} has {tok.vocab_size} ids but the model in {ckpt} only "
            f"model.vocab_size = {cfg.vocab_size}: they do not belong together"
        )
    model = GPTModel(cfg, ps, skip_init=True)
    state = load_model_shard(ckpt, tp=ps.tp_size, tp_rank=ps.tp_rank, pp=1, pp_rank=0)
    model.load_state_dict(state, strict=True)
    return model, tok


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except USER_ERRORS as e:
        rank = int(os.environ.get("RANK", "0"))
        who = f"rank {rank}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"{PROG}: error: {who}{e}", file=sys.stderr)
        return 2


def run(args) -> int:
    tool_cfg = load_config(GenerateToolConfig, args.config, args.overrides)
    prompts = read_prompts(args)
    rank, world = init_distributed(DIST_TIMEOUT_S)
    tp = args.tp or world
    if tp < 1 or world % tp:
        raise GenerateError(f"--tp {tp}: must be >= 1 and divide the {world} ranks")
    ps = build_parallel_state(tp=tp, pp=1, timeout_s=DIST_TIMEOUT_S)
    model, tok = load_model(args, ps)
    gen = tool_cfg.generation
    mine = list(range(ps.dp_rank, len(prompts), ps.dp_size))  # this DP rank's prompts
    results = {}
    for start in range(0, len(mine), args.batch_size):
        idx = mine[start : start + args.batch_size]
        ids = [tok.tokenize_pair(prompts[i], None, args.template).ids for i in idx]
        pids, pmask = left_pad(ids, tok.pad_id)
        if pids.shape[1] + gen.max_new_tokens > model.cfg.max_seq_len:
            raise GenerateError(
                f"a prompt of {pids.shape[1]} tokens + generation.max_new_tokens "
                f"{gen.max_new_tokens} exceeds the model's max_seq_len {model.cfg.max_seq_len}"
            )
        g = torch.Generator().manual_seed(gen.seed + 1000 * ps.dp_rank + start)
        out = generate(
            model, pids, pmask, gen, tok.eos_id, tok.pad_id, generator=g,
            vocab_limit=tok.vocab_size,
        )  # fmt: skip
        for row, i in enumerate(idx):
            n = int(out.response_mask[row].sum())
            toks = out.responses[row, :n].tolist()
            text = tok.decode([t for t in toks if t != tok.eos_id])
            lps = [round(x, 6) for x in out.logprobs[row, :n].tolist()]
            results[i] = {"prompt": prompts[i], "response": text, "tokens": toks, "logprobs": lps}
    if dist.is_initialized() and world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, results)
        results = {k: v for part in gathered for k, v in part.items()}
    if rank == 0:
        lines = [json.dumps(results[i]) for i in range(len(prompts))]
        text = "\n".join(lines) + "\n"
        if args.output:
            try:
                with open(args.output, "w") as f:
                    f.write(text)
            except OSError as e:
                raise GenerateError(f"--output {args.output}: cannot write it ({e})") from e
        else:
            sys.stdout.write(text)
    # Only on success: a failing rank exits at once and its peers' collectives error out.
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
