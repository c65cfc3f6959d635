"""Training: the iteration loop, checkpoints and logging."""
