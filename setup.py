"""Installs megarlhf.

`kernels/` and `csrc/` live at the top of the repository (the design card) but install as
`megarlhf.kernels` and `megarlhf.csrc`: a top-level `kernels` module would collide with an
unrelated PyPI package that transformers probes for. C++ sources are compiled just-in-time on first
use (torch.utils.cpp_extension), so installing never needs a compiler or a second torch download.
"""

from setuptools import find_packages, setup

packages = ["megarlhf"] + [f"megarlhf.{p}" for p in find_packages("megarlhf")]
packages += ["megarlhf.kernels"] + [f"megarlhf.kernels.{p}" for p in find_packages("kernels")]
packages += ["megarlhf.csrc"]

setup(
    name="megarlhf",
    version="0.1.0",
    description="Megatron-style RLHF trainer (SFT, reward model, PPO) with TP/PP/ZeRO",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"megarlhf.kernels": "kernels", "megarlhf.csrc": "csrc"},
    package_data={"megarlhf.csrc": ["*.cpp", "*.h"]},
    # torch is deliberately not listed: pip would resolve an unpinned torch to a CUDA build.
    # requirements.txt pins the stack; install it first (the Makefile does).
    install_requires=["numpy", "pyyaml", "safetensors", "sentencepiece", "tqdm"],
    extras_require={
        "gpu": ["flash-attn"],
        "trl": ["trl==1.12.0"],
        # Experiment trackers beside metrics.jsonl and TensorBoard (logging.wandb, logging.mlflow).
        "wandb": ["wandb==0.31.0"],
        # The tracking client, and the SQLite store MLflow 3 wants for local runs (mlflow.db).
        "mlflow": ["mlflow-skinny==3.17.2", "sqlalchemy==2.1.9", "alembic==1.20.1"],
    },
)
