"""Reward-model training (the second InstructGPT stage) under any launcher.

    # one plain process
    python tools/train_rm.py --config configs/rm_tiny.yaml --output-dir runs/rm
    # N ranks on this machine
    deepspeed --num_gpus N tools/train_rm.py --config configs/rm_tiny.yaml --output-dir runs/rm
    torchrun --nproc_per_node N tools/train_rm.py --config configs/rm_tiny.yaml --output-dir ...
    # several machines (hostfile lines: "worker-1 slots=8")
    deepspeed --num_nodes 4 --num_gpus 8 --hostfile HOSTS tools/train_rm.py --config ...
    # start from an SFT checkpoint (its LM head is dropped, the scalar head starts fresh)
    python tools/train_rm.py --config configs/rm_tiny.yaml --output-dir runs/rm \
        --init-from runs/sft/checkpoints/step_000036

Dotted overrides follow the options: `optim.lr=1e-4 parallel.tp=2 rm.micro_batch_size=2`.
Batches are counted in prompts (all K completions of a prompt go into one micro-batch). After the
last step the reward is normalized on `rm.normalize_files` (its mean there becomes 0) and the
final checkpoint holds the normalized head. A run resumes automatically from
`<output-dir>/checkpoints` when it holds a complete checkpoint (`checkpoint.resume=auto`);
`--resume` insists on one, `--resume-from PATH` picks a step directory. See docs/rm.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Threads must be fixed before torch starts its pools: train_common imports no torch at import.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.train_common import main as train_main  # noqa: E402
from tools.train_common import parse_args  # noqa: E402


def main(argv=None) -> int:
    args = parse_args("train_rm.py", __doc__, "configs/rm_tiny.yaml", argv)
    from megarlhf.config.rm import RMRunConfig
    from megarlhf.trainers.rm import RMTrainer

    return train_main(args, prog="train_rm.py", config_cls=RMRunConfig, make_trainer=RMTrainer)


if __name__ == "__main__":
    sys.exit(main())
