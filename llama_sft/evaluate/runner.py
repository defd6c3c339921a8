"""Running a model over evaluation records: teacher-forced loss and batched generation."""
from __future__ import annotations

import time
from typing import Any, Sequence

from llama_sft.data.collate import pad_collate
from llama_sft.data.records import read_sft_jsonl
from llama_sft.data.tokenize import IGNORE_INDEX, encode_example
from llama_sft.errors import DataError
from llama_sft.evaluate.metrics import score_example
from llama_sft.evaluate.settings import GenerationSettings
from llama_sft.files import verify_file_against_manifest
from llama_sft.model.generation.batch import generate_many, length_batches


def select_records(path: str, split: str | None, num_samples: int) -> tuple[list[dict], int]:
    """The first ``num_samples`` records (all with 0) of ``split``, and how many matched."""
    verify_file_against_manifest(path)
    records = read_sft_jsonl(path, split)
    if not records:
        where = f" with split {split!r}; check --split" if split else ""
        raise DataError(f"{path} has no records{where}")
    return (records[:num_samples] if num_samples else records), len(records)


def teacher_forced_losses(model, tokenizer, fmt, records: Sequence[dict], max_length: int,
                          batch_size: int, desc: str = "loss") -> list[tuple[float, int] | None]:
    """Per record (sum of NLL over the reference tokens, token count); None when it does not fit.

    Tokenized exactly as in training (``encode_example``: prompt masked, response + terminator
    supervised), right-padded with ``pad_collate``.
    """
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    encoded = [encode_example(tokenizer, fmt, r, max_length, train_on="last") for r in records]
    valid = [i for i, e in enumerate(encoded) if e is not None and e.num_supervised]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    results: list[tuple[float, int] | None] = [None] * len(records)
    for batch in tqdm(length_batches([len(encoded[i]) for i in valid], batch_size), desc=desc,
                      unit="batch", leave=False):
        rows = [valid[j] for j in batch]
        tensors = pad_collate([encoded[i] for i in rows], pad)
        with torch.inference_mode():
            logits = model(input_ids=tensors["input_ids"].to(device),
                           attention_mask=tensors["attention_mask"].to(device)).logits
        labels = tensors["labels"][:, 1:].to(device)
        for row, index in enumerate(rows):
            keep = labels[row] != IGNORE_INDEX
            nll = F.cross_entropy(logits[row, :-1][keep].float(), labels[row][keep],
                                  reduction="sum")
            results[index] = (float(nll), int(keep.sum()))
    return results


def generate_all(model, tokenizer, prompts: Sequence[Sequence[int]], gen: GenerationSettings,
                 desc: str = "generate", stop_ids: Sequence[int] | None = None
                 ) -> tuple[list[list[Any]], dict[str, Any]]:
    """Generations per prompt (``num_return_sequences`` each) and the speed figures."""
    from tqdm.auto import tqdm

    k = gen.num_return_sequences
    start = time.perf_counter()
    with tqdm(total=len(prompts), desc=desc, unit="prompt", leave=False) as bar:
        results, prefills = generate_many(
            model, tokenizer, prompts, batch_size=gen.batch_size,
            max_new_tokens=gen.max_new_tokens, temperature=gen.temperature, top_p=gen.top_p,
            num_return_sequences=k, on_done=bar.update, stop_ids=stop_ids)
    seconds = time.perf_counter() - start
    outputs = [results[i * k:(i + 1) * k] for i in range(len(prompts))]
    tokens = sum(len(g.token_ids) for g in results)
    speed = {"generated_tokens": tokens, "seconds": seconds,
             "tokens_per_second": tokens / seconds if seconds else None,
             "batch_size": gen.batch_size, "prefill_calls": prefills,
             "seconds_per_example": seconds / len(prompts) if prompts else None}
    return outputs, speed


def run_model(model, tokenizer, fmt, records: Sequence[dict], prompts: Sequence[Sequence[int]],
              gen: GenerationSettings, max_length: int, label: str) -> tuple[list[dict], dict]:
    """Loss and generations for every record: per-example SAMPLE dicts and the speed figures."""
    import torch

    losses = teacher_forced_losses(model, tokenizer, fmt, records, max_length, gen.batch_size,
                                   desc=f"{label} loss")
    torch.manual_seed(gen.seed)
    outputs, speed = generate_all(model, tokenizer, prompts, gen, desc=f"{label} generate",
                                  stop_ids=fmt.stop_ids(tokenizer))
    samples = []
    for record, loss, generations in zip(records, losses, outputs):
        samples.append({
            "loss": None if loss is None else loss[0] / loss[1],
            "response_tokens": None if loss is None else loss[1],
            "generations": [{"text": g.text, "generated_tokens": len(g.token_ids),
                             "stopped": g.stopped,
                             "scores": score_example(g.text, record["response"])}
                            for g in generations]})
    return samples, speed
