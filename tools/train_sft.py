"""Supervised fine-tuning (the first InstructGPT stage) under any launcher.

    # one plain process
    python tools/train_sft.py --config configs/sft_tiny.yaml --output-dir runs/sft
    # N ranks on this machine
    deepspeed --num_gpus N tools/train_sft.py --config configs/sft_tiny.yaml --output-dir runs/sft
    torchrun --nproc_per_node N tools/train_sft.py --config configs/sft_tiny.yaml --output-dir ...
    # several machines (hostfile lines: "worker-1 slots=8")
    deepspeed --num_nodes 4 --num_gpus 8 --hostfile HOSTS tools/train_sft.py --config ...

Dotted overrides follow the options: `optim.lr=1e-4 parallel.tp=2 deepspeed.zero_stage=2`.
A run resumes automatically from `<output-dir>/checkpoints` when it holds a complete checkpoint
(`checkpoint.resume=auto`); `--resume` insists on one, `--resume-from PATH` picks a step directory.
See docs/sft.md for the support matrix and the output layout. Arguments, launchers, threads and
teardown are shared with the other training tools (`tools/train_common.py`).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Threads must be fixed before torch starts its pools: train_common imports no torch at import.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.train_common import main as train_main  # noqa: E402
from tools.train_common import parse_args  # noqa: E402


def main(argv=None) -> int:
    args = parse_args("train_sft.py", __doc__, "configs/sft_tiny.yaml", argv)
    from megarlhf.config.sft import SFTRunConfig
    from megarlhf.trainers.sft import SFTTrainer

    return train_main(args, prog="train_sft.py", config_cls=SFTRunConfig, make_trainer=SFTTrainer)


if __name__ == "__main__":
    sys.exit(main())
