"""The training kernels (llama_sft/model/kernels): each equals the library path it replaces, and
the ``kernels`` setting switches each one on or off."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import ROOT, make_records, write_jsonl
from llama_sft.config.settings import KERNELS, LoraSettings, resolve_config
from llama_sft.errors import ConfigError
from llama_sft.model.kernels.fused_lora import LoraSiblings

FAULTS_SCRIPT = """
import ctypes, resource, sys
from llama_sft.model.kernels.memory import retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
counts = []
for size in (16 << 20, 16 << 20, 16 << 20, 24 << 20, 24 << 20):   # MiB buffers, written, freed
    before = faults()
    buffer = libc.malloc(size)
    ctypes.memset(buffer, 1, size)
    libc.free(buffer)
    counts.append(faults() - before)
print(sum(counts[1:]))
"""


def test_retained_memory_is_reused_without_page_faults():
    """Buffers allocated, written and freed as a training step's activations are (through glibc's
    malloc, as torch's CPU allocator does): retained, the same buffer again costs no page fault and
    a larger one faults in only its growth; by default glibc maps and unmaps them, faulting every
    page in each time."""
    import platform

    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")

    def faults(mode):
        proc = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT, mode], cwd=ROOT, check=True,
                              capture_output=True, text=True)
        return int(proc.stdout.split()[-1])

    default, retained = faults("default"), faults("retain")
    # after the first 16 MiB buffer: 8 MiB of growth is 2,048 pages; by default about 12,000
    assert default > 8000
    assert retained < 3000


def test_lora_dropout_is_swapped_and_is_inverted_dropout(tiny_model_dir):
    """attach_lora swaps every LoRA input dropout for MaskDropout, which drops with probability p,
    scales the kept values by 1/(1-p), follows torch's seed, passes gradients through the mask
    only, and is the identity in eval mode."""
    import torch

    from llama_sft.config.settings import LoraSettings
    from llama_sft.model.kernels.dropout import mask_dropout_class
    from llama_sft.model.loading import load_base_model
    from llama_sft.model.lora import attach_lora

    model = attach_lora(load_base_model(str(tiny_model_dir), dtype="float32"),
                        LoraSettings(lora_r=4, lora_alpha=8, lora_dropout=0.1),
                        quantized=False, gradient_checkpointing=False)
    MaskDropout = mask_dropout_class()
    lora_layers = [m for m in model.modules() if hasattr(m, "lora_A")]
    assert lora_layers and all(isinstance(m.lora_dropout["default"], MaskDropout)
                               for m in lora_layers)
    assert not any(type(m) is torch.nn.Dropout and m.p > 0 for m in model.modules())

    drop = MaskDropout(0.1).train()
    x = torch.ones(1000, 1000, requires_grad=True)
    torch.manual_seed(3)
    y = drop(x)
    dropped = float((y == 0).float().mean())
    assert abs(dropped - 0.1) < 0.003                      # 1e6 draws: sd of the rate is 3e-4
    assert torch.allclose(y[y != 0], torch.tensor(1 / 0.9), rtol=1e-4)
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())                 # d(sum y)/dx = mask * scale
    torch.manual_seed(3)
    assert torch.equal(drop(x), y)
    assert not torch.equal(drop(x), y)                     # the next call draws a new mask
    assert drop.eval()(x) is x
    # p = 1/512: decided by the low byte alone (8-bit draws would drop none or twice as many)
    with torch.no_grad():
        dropped = int((MaskDropout(1 / 512).train()(x) == 0).sum())
    assert abs(dropped - 1953) < 200                       # 1e6 * p, sd 44


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("outs", [(4,), (4, 2, 3)])
def test_fused_lora_function_gradients_are_exact(with_bias, with_mask, outs):
    """The fused LoRA linear, for one linear and for three sharing their input:
    forward is x W_i^T + b_i + s_i((m_i*x)(d_i A_i)^T)B_i^T side by side, and torch's
    finite-difference check accepts its backward for the input and every adapter matrix."""
    import torch

    from llama_sft.model.kernels.fused_lora import lora_linear_function

    fn = lora_linear_function()
    gen = torch.Generator().manual_seed(0)
    n = len(outs)
    x = torch.randn(7, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    a = [torch.randn(3, 5, dtype=torch.float64, generator=gen, requires_grad=True) for _ in outs]
    b = [torch.randn(o, 3, dtype=torch.float64, generator=gen, requires_grad=True) for o in outs]
    weight = torch.randn(sum(outs), 5, dtype=torch.float64, generator=gen)
    bias = torch.randn(sum(outs), dtype=torch.float64, generator=gen) if with_bias else None
    masks = [(torch.rand(7, 5, generator=gen) > 0.3).double() if with_mask else None
             for _ in outs]
    scales = tuple(((1.25 + i) if with_mask else 1.0, 2.0 - 0.5 * i) for i in range(n))
    out = fn.apply(x, weight, bias, scales, *a, *b, *masks)
    expected = x @ weight.T + (0 if bias is None else bias)
    adapters = [s * ((x if m is None else x * m) @ (d * ai).T) @ bi.T
                for (d, s), ai, bi, m in zip(scales, a, b, masks)]
    assert torch.allclose(out, expected + torch.cat(adapters, dim=1), atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda x, *ab: fn.apply(x, weight, bias, scales, *ab, *masks), (x, *a, *b))


def _lora_grads(model, batch, seed):
    import torch

    model.zero_grad()
    torch.manual_seed(seed)
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    return float(loss.detach()), {k: p.grad.float().clone() for k, p in model.named_parameters()
                         if p.requires_grad}


def _set_lora_forward(model, fused: bool) -> None:
    from peft.tuners.lora import Linear as LoraLinear

    from llama_sft.model.kernels.fused_lora import fused_lora_class

    for module in model.modules():
        if isinstance(module, LoraLinear):
            module.__class__ = fused_lora_class() if fused else LoraLinear


def test_fused_lora_forward_matches_peft(tiny_model_dir, monkeypatch):
    """attach_lora gives every LoRA linear the fused forward, q/k/v and gate/up computed
    together. In fp32 it reproduces peft's own forward, dropout masks included (same seed, same
    loss and gradients); in bf16 its error against the fp32 result is of the size of peft's own
    bf16 error. Small inputs, disabled adapters, merged weights and autocast go through peft's
    forward."""
    import torch

    from llama_sft.config.settings import LoraSettings
    from llama_sft.model.kernels.fused_lora import fused_lora_class
    from llama_sft.model.loading import load_base_model
    from llama_sft.model.lora import attach_lora

    grouped = []
    group_forward = LoraSiblings.forward

    def counted(self, x, adapter):
        out = group_forward(self, x, adapter)
        if out is not None:
            grouped.append(len(self.modules))
        return out

    monkeypatch.setattr(LoraSiblings, "forward", counted)

    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    # 1024 tokens: every LoRA input (width 64 or 128) reaches the fused path's MIN_NUMEL
    ids = torch.randint(0, 500, (2, 512), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids}
    results = {}
    for dtype in ("float32", "bfloat16"):
        torch.manual_seed(0)
        model = attach_lora(load_base_model(str(tiny_model_dir), dtype=dtype),
                            LoraSettings(lora_r=8, lora_alpha=16, lora_dropout=0.1,
                                         lora_target_modules=targets),
                            quantized=False, gradient_checkpointing=False)
        if dtype == "float32":
            assert sum(type(m) is fused_lora_class() for m in model.modules()) == 14
            attn = model.base_model.model.model.layers[0].self_attn
            siblings = attn.q_proj.lora_siblings
            assert siblings is attn.v_proj.lora_siblings
            assert siblings.stacked_weight().shape[0] == sum(
                getattr(attn, n).out_features for n in ("q_proj", "k_proj", "v_proj"))
            moved = attn.k_proj.base_layer.weight                 # a weight replaced elsewhere
            attn.k_proj.base_layer.weight = torch.nn.Parameter(moved.clone(), requires_grad=False)
            assert siblings.stacked_weight() is None
            attn.k_proj.base_layer.weight = moved
            assert torch.equal(attn.k_proj.base_layer.weight, load_base_model(
                str(tiny_model_dir), dtype=dtype).model.layers[0].self_attn.k_proj.weight)
            state = {k: v.clone() for k, v in model.state_dict().items()}
            gen = torch.Generator().manual_seed(2)
            state.update({k: torch.randn(v.shape, generator=gen) * 0.05
                          for k, v in state.items() if "lora_B" in k})
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in state.items()})
        model.train()
        for fused in (True, False):
            _set_lora_forward(model, fused)
            grouped.clear()
            results[dtype, fused] = _lora_grads(model, batch, seed=5)
            # 2 layers x (q/k/v + gate/up) computed as groups when fused
            assert sorted(grouped) == ([2, 2, 3, 3] if fused else [])
        if dtype == "float32":
            _set_lora_forward(model, True)
            layer = next(m for m in model.modules() if type(m) is fused_lora_class())
            x = torch.randn(layer.MIN_NUMEL // layer.in_features, layer.in_features)
            assert layer._fusable_adapter(x, (), {}) == "default"
            assert layer._fusable_adapter(x[:-1], (), {}) is None               # too small
            assert layer._fusable_adapter(x.bfloat16(), (), {}) is None
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert layer._fusable_adapter(x, (), {}) is None
            model.eval()
            with torch.no_grad():
                fused_eval = model(**batch).logits
                with model.disable_adapter():
                    assert layer._fusable_adapter(x, (), {}) is None
                    base = model(**batch).logits
                assert not torch.allclose(fused_eval, base, atol=1e-3)     # the adapter is live
                model.merge_adapter()
                assert layer._fusable_adapter(x, (), {}) is None
                assert torch.allclose(model(**batch).logits, fused_eval, atol=1e-4)

    def rel(grads, ref):
        return max(float((grads[k] - ref[k]).norm() / ref[k].norm()) for k in ref)

    (loss_f, grads_f), (loss_p, grads_p) = results["float32", True], results["float32", False]
    assert loss_f == pytest.approx(loss_p, rel=1e-6) and rel(grads_f, grads_p) < 1e-5
    fused_err = rel(results["bfloat16", True][1], grads_p)
    peft_err = rel(results["bfloat16", False][1], grads_p)
    assert fused_err < 2 * peft_err + 0.01, (fused_err, peft_err)


def test_packed_attention_matches_the_masked_sdpa_path(tiny_model_dir):
    """Per-example attention on a packed row (packed_attention, given the collate's
    cu_seq_lens) gives the loss and gradients of transformers' SDPA with the block-diagonal mask,
    and falls back to that SDPA when no boundaries are passed."""
    import torch

    from llama_sft.data.collate import pack_collate
    from llama_sft.data.prompt_format import PromptFormat
    from llama_sft.data.tokenize import encode_records
    from llama_sft.model.kernels.packed_attention import packed_attention
    from llama_sft.model.loading import load_base_model, load_tokenizer
    from llama_sft.train.loss import supervised_loss

    tok = load_tokenizer(str(tiny_model_dir))
    examples, _ = encode_records(tok, PromptFormat.for_tokenizer(tok), make_records(6), 256)
    batch = pack_collate(examples)
    assert batch["cu_seq_lens_q"].tolist()[-1] == batch["input_ids"].shape[1]
    n = sum(e.num_supervised for e in examples)
    results = {}
    for impl in ("sdpa", packed_attention()):
        model = load_base_model(str(tiny_model_dir), dtype="float32", attn_implementation=impl)
        assert model.config._attn_implementation == impl
        loss = supervised_loss(model, batch, n)
        loss.backward()
        grad = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
        with torch.no_grad():
            plain = {k: v for k, v in batch.items() if not k.startswith("cu_seq_lens")}
            fallback = supervised_loss(model, plain, n)
        results[impl] = (loss.item(), grad, fallback.item())
    (loss_a, grad_a, fb_a), (loss_b, grad_b, fb_b) = results.values()
    assert abs(loss_a - loss_b) < 1e-5 and abs(fb_a - fb_b) < 1e-6
    assert torch.allclose(grad_a, grad_b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_fast_rms_norm_is_transformers_norm_bit_for_bit(dtype):
    """FastRMSNorm (fast_rms_norms swaps it in for every LlamaRMSNorm) gives transformers' outputs
    and gradients, for the input and the weight, bit for bit."""
    import torch
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from llama_sft.model.kernels.rms_norm import fast_rms_norms

    gen = torch.Generator().manual_seed(0)
    dtype = getattr(torch, dtype)
    x = (torch.randn(3, 50, 96, generator=gen) * 4 + 1).to(dtype)
    grad_out = torch.randn(3, 50, 96, generator=gen).to(dtype)
    results = []
    for fast in (False, True):
        norm = LlamaRMSNorm(96, eps=1e-5).to(dtype)
        with torch.no_grad():
            norm.weight.copy_(torch.rand(96, generator=torch.Generator().manual_seed(1)) + 0.5)
        holder = torch.nn.Sequential(norm)
        if fast:
            assert fast_rms_norms(holder) == 1 and type(norm) is not LlamaRMSNorm
        inp = x.clone().requires_grad_()
        out = holder(inp)
        out.backward(grad_out)
        results.append((out, inp.grad, norm.weight.grad))
    for plain, fast in zip(*results):
        assert fast.dtype == plain.dtype and torch.equal(fast, plain)


def _kernel_types(model) -> set[str]:
    return {type(m).__name__ for m in model.modules()}


@pytest.mark.parametrize("kernels", [KERNELS, (), ("rms_norm",), ("fused_lora",),
                                     ("mask_dropout", "fused_lora", "lora_siblings")])
def test_kernels_setting_applies_exactly_the_named_kernels(tiny_model_dir, kernels):
    from llama_sft.model.loading import load_base_model
    from llama_sft.model.lora import attach_lora

    model = attach_lora(load_base_model(str(tiny_model_dir), dtype="float32"),
                        LoraSettings(lora_r=4, lora_alpha=8, lora_dropout=0.1,
                                     lora_target_modules=("q_proj", "k_proj", "v_proj")),
                        quantized=False, gradient_checkpointing=False, kernels=kernels)
    types = _kernel_types(model)
    assert ("MaskDropout" in types) == ("mask_dropout" in kernels)
    assert ("FusedLoraLinear" in types) == ("fused_lora" in kernels)
    assert ("FastRMSNorm" in types) == ("rms_norm" in kernels)
    assert ("LlamaRMSNorm" in types) == ("rms_norm" not in kernels)
    grouped = any(getattr(m, "lora_siblings", None) is not None for m in model.modules())
    assert grouped == ({"fused_lora", "lora_siblings"} <= set(kernels))


def test_kernels_setting_resolves_from_flags_and_files():
    assert resolve_config("135m").model.kernels == KERNELS
    assert resolve_config("135m", overrides={"kernels": "none"}).model.kernels == ()
    assert resolve_config("135m", overrides={"kernels": "rms_norm, fused_lora"}).model.kernels \
        == ("rms_norm", "fused_lora")
    assert resolve_config("135m", file_values={"kernels": []}).model.kernels == ()
    with pytest.raises(ConfigError, match="kernels must be one of"):
        resolve_config("135m", overrides={"kernels": "fused_lora,warp_drive"})


def test_training_without_kernels_matches_training_with_them(tiny_model_dir, tmp_path):
    """In fp32 without dropout the kernels change how the same numbers are computed, not what is
    computed: the first losses of a run with every kernel and of one with none agree."""
    import llama_train

    data = write_jsonl(tmp_path / "sft_dataset.jsonl", make_records(24))
    losses = {}
    for name, kernels in (("all", ",".join(KERNELS)), ("none", "none")):
        out = tmp_path / name
        assert llama_train.main(["--base-model", str(tiny_model_dir), "--dataset", str(data),
                                 "--output-dir", str(out), "--batch-size", "4",
                                 "--learning-rate", "5e-3", "--report-to", "none",
                                 "--no-progress", "--dtype", "float32", "--lora-dropout", "0",
                                 "--max-steps", "3", "--kernels", kernels]) == 0
        rows = (out / "metrics.jsonl").read_text().splitlines()
        losses[name] = [json.loads(r)["loss"] for r in rows if '"loss"' in r]
        saved = json.loads((out / "final_model" / "training_config.json").read_text())
        assert saved["kernels"] == ([] if kernels == "none" else list(KERNELS))
    assert len(losses["all"]) == 3
    assert losses["all"] == pytest.approx(losses["none"], rel=1e-4)
