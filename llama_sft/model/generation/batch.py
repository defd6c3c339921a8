"""Batched generation from token-id prompts: greedy (continuous) or sampled (``model.generate``)."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Sequence

from llama_sft.model.generation.continuous import greedy_continuous, left_padded


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    stopped: bool           # ended with a stop token before max_new_tokens


# generation_config keys that leave greedy decoding alone (sampling settings are overridden)
_GREEDY_SAFE_KEYS = {"bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id",
                     "use_cache", "output_attentions", "output_hidden_states", "do_sample",
                     "temperature", "top_p", "top_k", "max_length", "max_new_tokens",
                     "transformers_version", "_from_model_config", "cache_implementation"}


def generate_batch(model, tokenizer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 128,
                   temperature: float = 0.0, top_p: float = 1.0, num_return_sequences: int = 1,
                   streamer=None, stop_ids: Sequence[int] | None = None) -> list[Generation]:
    """Generate for token-id prompts in one left-padded batch (KV cache, greedy by default).

    Greedy decoding runs ``greedy_continuous`` (rows leave the batch at EOS) when the model's
    generation config asks for no extra logits processing; sampling, several return sequences,
    a streamer or such a config go through ``model.generate``. Generation stops at any token of
    ``stop_ids`` (default: EOS; give ``PromptFormat.stop_ids`` for the end-of-turn token).
    """
    import torch

    pad = _pad_id(tokenizer)
    stops = _stops(tokenizer, stop_ids)
    if _plain_greedy(model, temperature, num_return_sequences, streamer):
        rows = greedy_continuous(model, prompts, max_new_tokens=max_new_tokens, stop_ids=stops,
                                 pad_id=pad, batch_size=len(prompts))
        return [_generation(tokenizer, row, stops) for row in rows]
    ids, mask = left_padded(prompts, pad, next(model.parameters()).device)
    sample = temperature > 0
    kwargs = {"do_sample": sample, "max_new_tokens": max_new_tokens, "pad_token_id": pad,
              "eos_token_id": list(stops),
              "num_return_sequences": num_return_sequences, "use_cache": True,
              "streamer": streamer}
    if sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    return [_generation(tokenizer, row, stops) for row in out[:, ids.shape[1]:].tolist()]


def generate_many(model, tokenizer, prompts: Sequence[Sequence[int]], *, batch_size: int,
                  max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                  num_return_sequences: int = 1, on_done: Callable[[int], None] | None = None,
                  stop_ids: Sequence[int] | None = None) -> tuple[list[Generation], int]:
    """Generations for any number of prompts, in their order, at most ``batch_size`` at a time,
    and the number of batched prefill calls it took.

    Greedy decoding (see ``generate_batch``) is continuous: a finished row's place goes to the
    next waiting prompt. Otherwise prompts of similar length go through ``generate_batch`` in
    batches. ``on_done(n)`` is called as n more prompts finish (a progress bar's ``update``).
    """
    k = num_return_sequences
    stops = _stops(tokenizer, stop_ids)
    if _plain_greedy(model, temperature, k, None):
        rows, prefills = greedy_continuous(
            model, prompts, max_new_tokens=max_new_tokens, stop_ids=stops,
            pad_id=_pad_id(tokenizer), batch_size=batch_size, on_done=on_done,
            count_prefills=True)
        return [_generation(tokenizer, row, stops) for row in rows], prefills
    results: list[Generation] = [None] * (len(prompts) * k)  # type: ignore[list-item]
    batches = length_batches([len(p) for p in prompts], batch_size)
    for batch in batches:
        out = generate_batch(model, tokenizer, [prompts[i] for i in batch],
                             max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                             num_return_sequences=k, stop_ids=stops)
        for j, index in enumerate(batch):
            results[index * k:(index + 1) * k] = out[j * k:(j + 1) * k]
        if on_done is not None:
            on_done(len(batch))
    return results, len(batches)


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first (less padding, early OOM)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _plain_greedy(model, temperature: float, num_return_sequences: int, streamer) -> bool:
    """Whether ``greedy_continuous`` gives what ``model.generate`` would."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    config = getattr(model, "generation_config", None)
    plain = config is None or set(config.to_diff_dict()) <= _GREEDY_SAFE_KEYS
    layers = DynamicCache(config=model.config).layers    # sliding-window layers cannot be merged
    return (temperature <= 0 and num_return_sequences == 1 and streamer is None and plain
            and all(type(layer) is DynamicLayer for layer in layers))


def _stops(tokenizer, stop_ids: Sequence[int] | None) -> tuple[int, ...]:
    return tuple(stop_ids) if stop_ids else (tokenizer.eos_token_id,)


def _generation(tokenizer, row: Sequence[int], stops: Sequence[int]) -> Generation:
    """A Generation from generated ids: cut at the first stop token, decoded without special
    tokens."""
    tokens = list(itertools.takewhile(lambda t: t not in stops, row))
    stopped = len(tokens) < len(row)
    return Generation(tokenizer.decode(tokens, skip_special_tokens=True).strip(), tokens, stopped)
