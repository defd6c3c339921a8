"""Training: the loop, checkpoints and resume, distributed set-up, callbacks and loggers."""
