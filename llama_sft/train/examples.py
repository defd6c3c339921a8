"""The tokenized examples of a training run."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llama_sft.config.settings import RunConfig
from llama_sft.data.prompt_format import PromptFormat
from llama_sft.data.tokenize import Encoded, encode_records
from llama_sft.errors import EXIT_DATA, PipelineError


@dataclass
class TrainData:
    train: list[Encoded]
    eval: list[Encoded]
    samples: list[dict[str, Any]]        # golden records whose prompts are generated at each eval
    dropped: dict[str, int] = field(default_factory=dict)


def prepare_data(cfg: RunConfig, tokenizer, fmt: PromptFormat, train_records, eval_records,
                 sample_records) -> TrainData:
    """Tokenize; examples with zero supervised tokens never reach training."""
    train_on = cfg.data.train_on
    train, dropped_train = encode_records(tokenizer, fmt, train_records, cfg.data.max_length,
                                          train_on=train_on)
    evals, dropped_eval = encode_records(tokenizer, fmt, eval_records[:cfg.eval.max_eval_examples],
                                         cfg.data.max_length, train_on=train_on)
    if not train:
        raise PipelineError("0 trainable examples after tokenization (every example was empty or "
                            "longer than --max-length)", EXIT_DATA)
    return TrainData(train, evals, list(sample_records[:cfg.eval.num_eval_samples]),
                     {"train": dropped_train, "eval": dropped_eval})
