"""Optimization: AdamW and its schedule, the DeepSpeed (ZeRO) wrapper that steps a model stage,
and the EMA of weights."""
