"""Helpers the tests share (fixtures are in conftest.py): the repository root and small SFT records."""
from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CATEGORIES = ("classification", "extraction", "qa")


def make_records(n: int, split: str = "train", start: int = 0) -> list[dict]:
    """Small deterministic SFT records in the prep stage's output schema."""
    records = []
    for i in range(start, start + n):
        cat = CATEGORIES[i % len(CATEGORIES)]
        if cat == "classification":
            inst, ctx, resp = "Classify the sentiment as positive or negative.", \
                f"Review {i}: the product {'works great' if i % 2 else 'broke fast'}.", \
                "positive" if i % 2 else "negative"
        elif cat == "extraction":
            inst, ctx, resp = "Extract the order number as JSON.", \
                f"Hello, my order #{1000 + i} has not arrived.", json.dumps({"order": 1000 + i})
        else:
            inst, ctx, resp = f"What is {i} plus {i}?", "", str(2 * i)
        records.append({"id": f"ex-{i:05d}", "split": split, "category": cat,
                        "instruction": inst, "context": ctx, "response": resp, "metadata": {}})
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    return path


def random_adapter(model_dir: Path, out: Path, *, style: str = "auto",
                   target_modules: tuple[str, ...] = ("q_proj", "v_proj")) -> Path:
    """A final_model/-shaped adapter directory on ``model_dir`` with random (non-zero) LoRA
    weights, so that merging it changes the model."""
    import torch
    from peft import LoraConfig, get_peft_model

    from llama_sft.config.settings import resolve_config
    from llama_sft.data.prompt_format import PromptFormat
    from llama_sft.files import write_json, write_manifest
    from llama_sft.model.loading import load_base_model, load_tokenizer

    out.mkdir(parents=True)
    torch.manual_seed(1)
    model = load_base_model(str(model_dir), dtype="float32")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=list(target_modules),
                      init_lora_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer = load_tokenizer(str(model_dir))
    tokenizer.save_pretrained(out)
    PromptFormat.for_tokenizer(tokenizer, style=style).save(out)
    cfg = resolve_config("135m", overrides={"base_model": str(model_dir), "lora_r": 4,
                                            "lora_alpha": 8, "dtype": "float32"})
    write_json(out / "training_config.json", cfg.to_dict())
    write_manifest(out, stage="train", config=cfg.to_dict())
    return out


def hf_greedy(model, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """transformers' greedy tokens and the top-2 logit gap at each step."""
    import torch

    ids, gaps = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            top = torch.topk(logits, 2).values
            gaps.append(float(top[0] - top[1]))
            ids.append(int(logits.argmax()))
    return ids[len(prompt):], gaps
