"""Training kernels: each replaces a library path that profiling found slow on CPU, each is
switched on or off by name (the run setting ``kernels``), and benchmarks/README.md has their
measurements (``bench_train.py`` runs a variant without each)."""
