"""Pure RL math: ranking losses, KL controllers, advantages, PPO losses. No state, no I/O."""
