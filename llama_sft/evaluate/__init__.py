"""Evaluation: teacher-forced loss and generation metrics, fine-tuned against base, per category."""
