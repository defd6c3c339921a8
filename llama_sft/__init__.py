"""llama_sft: a staged supervised fine-tuning pipeline for LLaMA models.

The top-level scripts (``pipeline_sft_prep.py``, ``llama_pilot.py``, ``llama_train.py``,
``llama_evaluate.py``, ``llama_package.py``, ...) are thin entry points over this package; its
folders name the pipeline's parts. docs/architecture.md has the tree and how a run flows through it.
"""
