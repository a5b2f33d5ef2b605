"""PPO with a hybrid engine (the third InstructGPT stage) under any launcher.

    # one plain process
    python tools/train_ppo.py --config configs/ppo_tiny.yaml --output-dir runs/ppo
    # N ranks on this machine
    torchrun --nproc_per_node N tools/train_ppo.py --config configs/ppo_tiny.yaml --output-dir ...
    deepspeed --num_gpus N tools/train_ppo.py --config configs/ppo_tiny.yaml --output-dir ...
    # several machines (hostfile lines: "worker-1 slots=8")
    deepspeed --num_nodes 4 --num_gpus 8 --hostfile HOSTS tools/train_ppo.py \
        --config configs/ppo_llama_7b.yaml --output-dir runs/ppo
    # actor / reference from an SFT checkpoint, critic / reward model from an RM checkpoint
    python tools/train_ppo.py --config configs/ppo_tiny.yaml --output-dir runs/ppo \
        --init-from runs/sft/checkpoints/step_000036 \
        ppo.reward_model=runs/rm/checkpoints/step_000040

Dotted overrides follow the options: `ppo.kl_coef=0.05 parallel.tp=2 ppo.generation_tp=1`.
Empty `checkpoint.init_from` / `ppo.reward_model` start from a seeded random initialization
(logged as a warning; the shipped tiny config does this so it runs from a fresh clone).
Checkpoints under `<output-dir>/checkpoints/step_N` hold the actor (`model/`, loadable by
generate.py and init_from), the critic (`critic/`), both optimizers, the data positions, the KL
controller and every RNG; a run resumes from the latest one automatically
(`checkpoint.resume=auto`), `--resume` insists on one. See docs/ppo.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Threads must be fixed before torch starts its pools: train_common imports no torch at import.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.train_common import main as train_main  # noqa: E402
from tools.train_common import parse_args  # noqa: E402


def main(argv=None) -> int:
    args = parse_args("train_ppo.py", __doc__, "configs/ppo_tiny.yaml", argv)
    from megarlhf.config.ppo import PPORunConfig
    from megarlhf.trainers.ppo import PPOTrainer

    return train_main(args, prog="train_ppo.py", config_cls=PPORunConfig, make_trainer=PPOTrainer)


if __name__ == "__main__":
    sys.exit(main())
