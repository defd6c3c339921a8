"""Evaluation during training: loss on the eval examples, and generated samples."""
from __future__ import annotations

import math
from typing import Any

from llama_sft.data.collate import collate, to_device
from llama_sft.model.generation.batch import generate_batch
from llama_sft.train.loss import supervised_loss


def evaluate(trainer) -> dict[str, Any]:
    """Eval loss and perplexity over ``trainer.data.eval`` (all processes; a collective when
    distributed) and, on the main process, the samples generated for ``trainer.data.samples``."""
    import torch

    trainer.model.eval()
    pad_id = trainer.tokenizer.pad_token_id
    loss_sum, items = 0.0, 0
    bs = max(1, trainer.cfg.optim.batch_size)
    shard = trainer.data.eval[trainer.rank::trainer.world]
    # Under FSDP every forward is a collective: all ranks run the same number of batches,
    # a rank whose shard ran out repeats its first example with weight 0.
    rounds = math.ceil(math.ceil(len(trainer.data.eval) / trainer.world) / bs) if trainer.sharded \
        else math.ceil(len(shard) / bs)
    with torch.no_grad():
        for i in range(0, rounds * bs, bs):
            chunk = shard[i:i + bs]
            weight = 1 if chunk else 0
            chunk = chunk or trainer.data.eval[:1]
            n = sum(e.num_supervised for e in chunk)
            batch = to_device(collate(chunk, pad_id, trainer.cfg.data.packing), trainer.acc.device)
            with trainer.precision.autocast_context():
                loss = supervised_loss(trainer.model, batch, n)
            loss_sum += float(loss) * n * weight
            items += n * weight
    if trainer.world > 1:
        totals = trainer.acc.reduce(torch.tensor([loss_sum, float(items)],
                                                 device=trainer.acc.device), reduction="sum")
        loss_sum, items = float(totals[0]), int(totals[1])
    loss = loss_sum / items if items else float("nan")
    result = {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)),
              "eval_examples": len(trainer.data.eval)}
    if trainer.data.samples and (trainer.is_main or trainer.sharded):
        samples = generate_samples(trainer)   # sharded: every rank takes part in generate()
        if trainer.is_main:
            result["samples"] = samples
    return result


def generate_samples(trainer) -> list[dict[str, Any]]:
    """Greedy answers to the sample prompts, beside their references."""
    model = trainer.acc.unwrap_model(trainer.model)
    prompts = [trainer.fmt.encode_record_prompt(trainer.tokenizer, r)
               for r in trainer.data.samples]
    gens = generate_batch(model, trainer.tokenizer, prompts,
                          max_new_tokens=trainer.cfg.eval.max_new_tokens,
                          stop_ids=trainer.fmt.stop_ids(trainer.tokenizer))
    return [{"id": r.get("id"), "instruction": r["instruction"], "reference": r["response"],
             "generation": g.text, "stopped": g.stopped}
            for r, g in zip(trainer.data.samples, gens)]
