"""megarlhf: a Megatron-style RLHF trainer (SFT, reward model, PPO) for TP x PP x ZeRO-DP.

Importing the package starts no process group, reads no argv and sets no globals; entry points
live in `tools/`.
"""

__version__ = "0.1.0"
