"""Training: the pure step (loop), the wiring (trainer), checkpoints."""
