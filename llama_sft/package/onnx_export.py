"""ONNX export of a merged model for onnxruntime, with the KV cache as graph inputs and outputs.

The graph takes ``input_ids``, ``attention_mask`` (past + new tokens), ``position_ids`` and
``past_key_values.{layer}.key`` / ``.value`` ([batch, kv_heads, past, head_dim], fp32; empty for
the first pass) and returns ``logits`` and ``present.{layer}.key`` / ``.value`` (the past with the
new tokens appended), the input and output names that optimum's exports use too. ::

    from llama_sft.package.onnx_export import export_onnx, onnx_generate
    export_onnx(Path("merged"), Path("merged-onnx"))
    onnx_generate(Path("merged-onnx"), prompt_ids, max_new_tokens=64, stop_ids={eos_id})
"""
from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path

import numpy as np

from llama_sft.data.prompt_format import PromptFormat
from llama_sft.files import atomic_output_dir, published_mode

log = logging.getLogger("llama_package")

ONNX_FILE = "model.onnx"
PAST, PRESENT = "past_key_values", "present"
# Example sizes for the trace: every dynamic dimension must be at least 2, or torch.export
# specializes it to the example's value.
_BATCH, _NEW, _PAST = 2, 3, 4


def _cached_model(model):
    """``model`` as a module of plain tensors: ONNX graphs have no cache objects, so the past
    comes in as a flat (key, value, key, value, ...) tuple and is wrapped in a DynamicCache."""
    import torch
    from transformers import DynamicCache

    class CachedCausalLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache(list(zip(past[::2], past[1::2])), config=model.config)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids, past_key_values=cache, use_cache=True)
            present = [t for layer in out.past_key_values.layers
                       for t in (layer.keys, layer.values)]
            return (out.logits, *present)

    return CachedCausalLM().eval()


def _cache_names(prefix: str, n_layers: int) -> list[str]:
    return [f"{prefix}.{i}.{kind}" for i in range(n_layers) for kind in ("key", "value")]


def export_onnx(merged_dir: Path, out_dir: Path) -> Path:
    """Export the merged model in ``merged_dir`` to ``out_dir``/model.onnx (fp32, weights in
    model.onnx.data beside it), with the tokenizer, config and prompt format it is used with.

    Uses torch's dynamo exporter (``torch.onnx.export(dynamo=True)``): batch, new tokens and
    past length are dynamic, so one graph serves the prompt pass and every decoding step."""
    import torch
    from torch.export import Dim
    from transformers import AutoTokenizer

    from llama_sft.model.loading import load_base_model

    prompt_format = PromptFormat.load(merged_dir)       # fails before the slow part if missing
    model = load_base_model(str(merged_dir), dtype=torch.float32)
    config = model.config
    n_layers, kv_heads = config.num_hidden_layers, config.num_key_value_heads
    head_dim = (getattr(config, "head_dim", None)
                or config.hidden_size // config.num_attention_heads)
    past = [torch.zeros(_BATCH, kv_heads, _PAST, head_dim) for _ in range(2 * n_layers)]
    args = (torch.zeros(_BATCH, _NEW, dtype=torch.long),
            torch.ones(_BATCH, _PAST + _NEW, dtype=torch.long),
            torch.arange(_PAST, _PAST + _NEW).expand(_BATCH, _NEW), *past)
    batch, new, past_len = Dim("batch"), Dim("seq"), Dim("past")
    dynamic_shapes = ({0: batch, 1: new}, {0: batch, 1: Dim.AUTO}, {0: batch, 1: new},
                      ({0: batch, 2: past_len},) * len(past))
    for name in ("onnxscript", "onnx_ir"):     # their graph optimizer logs every rewrite at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    log.info("exporting %s to ONNX (fp32, on the CPU) ...", merged_dir)
    with atomic_output_dir(out_dir) as tmp, warnings.catch_warnings():
        # torch's own notices: one per reuse of an axis name, and a deprecation inside torch.export
        warnings.filterwarnings("ignore", message="# The axis name", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*treespec, LeafSpec", category=FutureWarning)
        torch.onnx.export(
            _cached_model(model), args, tmp / ONNX_FILE, dynamo=True, external_data=True,
            dynamic_shapes=dynamic_shapes, verbose=False,
            input_names=["input_ids", "attention_mask", "position_ids",
                         *_cache_names(PAST, n_layers)],
            output_names=["logits", *_cache_names(PRESENT, n_layers)])
        AutoTokenizer.from_pretrained(merged_dir).save_pretrained(tmp)
        for name in ("config.json", "generation_config.json"):
            if (merged_dir / name).exists():
                shutil.copyfile(merged_dir / name, tmp / name)
        prompt_format.save(tmp)
        for path in (tmp, *tmp.iterdir()):
            published_mode(path)
    log.info("wrote %s", out_dir)
    return out_dir


def _session(onnx_dir: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(Path(onnx_dir) / ONNX_FILE),
                                providers=["CPUExecutionProvider"])


def _empty_past(session) -> dict[str, np.ndarray]:
    """Zero-length past keys and values, shaped from the graph's own inputs."""
    return {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
            for i in session.get_inputs() if i.name.startswith(PAST)}


def _forward(session, ids: list[int], past: dict[str, np.ndarray], start: int):
    """Logits [len(ids), vocab] for ``ids`` at positions start.., and the past including them."""
    feed = {"input_ids": np.array([ids], np.int64),
            "attention_mask": np.ones((1, start + len(ids)), np.int64),
            "position_ids": np.arange(start, start + len(ids), dtype=np.int64)[None], **past}
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))
    present = {name.replace(PRESENT, PAST, 1): value for name, value in outputs.items()
               if name.startswith(PRESENT)}
    return outputs["logits"][0], present


def onnx_logits(onnx_dir: Path, input_ids: list[int]) -> np.ndarray:
    """The logits [len(input_ids), vocab] of one pass without a cache."""
    session = _session(onnx_dir)
    return _forward(session, input_ids, _empty_past(session), 0)[0]


def onnx_generate(onnx_dir: Path, prompt_ids: list[int], max_new_tokens: int,
                  stop_ids: set[int]) -> list[int]:
    """Greedy decoding: the prompt in one pass, then one token per pass over the KV cache.
    Stops at a token in ``stop_ids`` (left out of the result) or after ``max_new_tokens``."""
    session = _session(onnx_dir)
    logits, past = _forward(session, prompt_ids, _empty_past(session), 0)
    tokens: list[int] = []
    while len(tokens) < max_new_tokens:
        token = int(logits[-1].argmax())
        if token in stop_ids:
            break
        tokens.append(token)
        if len(tokens) < max_new_tokens:
            logits, past = _forward(session, [token], past, len(prompt_ids) + len(tokens) - 1)
    return tokens
