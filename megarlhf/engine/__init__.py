"""Hybrid engine: re-sharding between the training and generation layouts, rollouts."""
