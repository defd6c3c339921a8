"""Models: the embedded default, loading (nobody else loads a model), LoRA, kernels, generation."""
