"""Training stages (SFT now; reward model and PPO later) and the DeepSpeed engine they share."""
