"""The rollout side of PPO: the hybrid engine (re-sharding between the training and generation
layouts, rollouts), frozen-model placement, and the experience maker."""
