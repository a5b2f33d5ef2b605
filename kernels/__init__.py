"""Fused kernels for RLHF: vocab-parallel log-probs / entropy / KL, KL estimators, and GAE.

Import as `megarlhf.kernels` (this directory installs under the megarlhf package; never import it
as a top-level `kernels`). Each op dispatches to the fastest backend for the tensor's device:
Triton on CUDA, C++ (OpenMP, built just-in-time from megarlhf/csrc) on CPU, pure torch otherwise.
`python -m megarlhf.report` lists what is available here and why.
"""

from megarlhf.kernels._dispatch import available_backends, backend_status
from megarlhf.kernels.gae import gae
from megarlhf.kernels.kl import k1, k2, k3, kl_penalty
from megarlhf.kernels.logprobs import logprobs_from_logits

__all__ = [
    "available_backends",
    "backend_status",
    "gae",
    "k1",
    "k2",
    "k3",
    "kl_penalty",
    "logprobs_from_logits",
]
