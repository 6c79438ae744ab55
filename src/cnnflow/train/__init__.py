"""Training: the wiring (trainer), the epoch loop (epochs), its metrics (metrics), the pure
pieces (loop: augmentation, optimizer, schedule), data streams (data), this run's
checkpoints (resume) over the checkpoint store (checkpoint), the profiler (profiling)."""
