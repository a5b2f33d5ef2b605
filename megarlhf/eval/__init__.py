"""Evaluation: simulated labelers and their statistics (`labelers`), and model measurements on
checkpoints (`lm`: log-probs, perplexity, reward scores)."""
