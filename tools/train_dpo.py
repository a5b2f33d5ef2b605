"""Direct preference optimization (DPO; IPO with dpo.loss=ipo) under any launcher.

    # one plain process, from an SFT checkpoint (also the frozen reference)
    python tools/train_dpo.py --config configs/dpo_tiny.yaml --output-dir runs/dpo \
        --init-from runs/sft/checkpoints/step_000036
    # N ranks on this machine
    deepspeed --num_gpus N tools/train_dpo.py --config configs/dpo_tiny.yaml --output-dir ...
    torchrun --nproc_per_node N tools/train_dpo.py --config configs/dpo_tiny.yaml --output-dir ...
    # several machines (hostfile lines: "worker-1 slots=8")
    deepspeed --num_nodes 4 --num_gpus 8 --hostfile HOSTS tools/train_dpo.py --config ...

Dotted overrides follow the options: `dpo.beta=0.1 dpo.loss=ipo dpo.micro_batch_size=2
dpo.precompute_reference=true parallel.tp=2`. The data is the reward model's (K-way rankings or
chosen/rejected pairs; every pair of a prompt in one batch element) and batches are counted in
prompts. The reference is the initial policy (`--init-from`), forwarded with every batch, or
scored once before step 1 with dpo.precompute_reference=true. A run resumes automatically from
`<output-dir>/checkpoints` when it holds a complete checkpoint (`checkpoint.resume=auto`);
`--resume` insists on one, `--resume-from PATH` picks a step directory. See docs/dpo.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Threads must be fixed before torch starts its pools: train_common imports no torch at import.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.train_common import main as train_main  # noqa: E402
from tools.train_common import parse_args  # noqa: E402


def main(argv=None) -> int:
    args = parse_args("train_dpo.py", __doc__, "configs/dpo_tiny.yaml", argv)
    from megarlhf.config.dpo import DPORunConfig
    from megarlhf.trainers.dpo import DPOTrainer

    return train_main(args, prog="train_dpo.py", config_cls=DPORunConfig, make_trainer=DPOTrainer)


if __name__ == "__main__":
    sys.exit(main())
