"""Trainers: the one training loop (`loop.py`) and the three InstructGPT stages on it (`sft.py`,
`rm.py`, `ppo.py`)."""
