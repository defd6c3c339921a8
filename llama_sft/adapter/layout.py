"""The file names of an adapter directory (``final_model/``) and of a package."""
from __future__ import annotations

from llama_sft.data.prompt_format import PROMPT_FORMAT_FILE

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
PROMPT_FORMAT = PROMPT_FORMAT_FILE
TRAINING_CONFIG = "training_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "tokenizer.model", "added_tokens.json", "vocab.json",
                   "merges.txt")
COPIED_FILES = ADAPTER_FILES + TOKENIZER_FILES + (PROMPT_FORMAT,)
METADATA = "metadata.json"
SUMS = "SHA256SUMS"
EVALUATION = "evaluation.json"
GENERATED_FILES = (METADATA, "README.md", "requirements.txt", SUMS)
ALLOWED_FILES = frozenset(COPIED_FILES + GENERATED_FILES + (EVALUATION,))
REQUIRED_FILES = ADAPTER_FILES + ("tokenizer_config.json", PROMPT_FORMAT, METADATA, SUMS)

# Read into metadata.json, never copied.
RECORD_FILES = ("training_config.json", "manifest.json", "metrics_summary.json", METADATA, SUMS)
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz")
PACKAGE_FORMAT = "llama-sft-package"
PACKAGE_FORMAT_VERSION = 1
