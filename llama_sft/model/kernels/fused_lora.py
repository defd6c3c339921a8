"""Fused LoRA linears: the frozen linear and its adapter in one autograd function, and sibling
linears that read the same input (q/k/v, gate/up) computed together over one stacked weight."""
from __future__ import annotations

import functools
from typing import Any

from llama_sft.model.kernels.dropout import mask_dropout_class


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
                # (h^T g)^T: faster on CPU than g^T h for these thin shapes
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
