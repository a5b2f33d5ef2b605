"""Performance models: FLOPs (for TFLOPs / MFU) and memory (for the cluster planner)."""
