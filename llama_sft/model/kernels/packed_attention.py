"""Attention over padding-free packed rows, one causal SDPA call per packed example."""
from __future__ import annotations

import functools

PACKED_ATTENTION = "sdpa_packed"


@functools.cache
def packed_attention() -> str:
    """Register (once) and name the attention that training uses on packed rows.

    Given ``cu_seq_lens_q`` (the boundaries ``data.collate.pack_collate`` passes), each packed
    example attends only within itself, with no L x L block-diagonal mask over the whole row:
    - on CUDA in bf16/fp16, torch's flash varlen attention takes the whole row, the boundaries
      and ``max_length_q`` at once (no lengths read back from the GPU; GQA native);
    - otherwise causal SDPA runs on each example cut out of the row with ``split`` (whose backward
      is one ``cat``; a slice per example would fill a row-long zero tensor in each slice's
      backward), on CPU in fp32, where SDPA's kernel is faster than in bf16.
    Without the boundaries (evaluation, generation, padded batches) it is transformers' own SDPA,
    mask and all. benchmarks/README.md has the CPU measurements behind these choices.
    """
    import torch
    import torch.nn.functional as F
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    try:                                   # torch 2.9 and newer
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        varlen_attn = None

    def packed_sdpa_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                            cu_seq_lens_q=None, max_length_q=None, **kwargs):
        if cu_seq_lens_q is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
            return sdpa_attention_forward(module, query, key, value, attention_mask,
                                          dropout=dropout, scaling=scaling, **kwargs)
        if (varlen_attn is not None and query.device.type == "cuda" and not dropout
                and query.dtype in (torch.bfloat16, torch.float16) and max_length_q is not None):
            return _flash_varlen(varlen_attn, query, key, value, cu_seq_lens_q, max_length_q,
                                 scaling), None
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


def _flash_varlen(varlen_attn, query, key, value, cu_seq_lens, max_length: int, scaling):
    """Causal flash attention over the packed examples of one row: [1, heads, L, dim] inputs,
    [1, L, heads, dim] output, as transformers' attention functions return it."""
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))      # [L, heads, dim]
    out = varlen_attn(q, k, v, cu_seq_lens, cu_seq_lens, max_length, max_length, scale=scaling,
                      window_size=(-1, 0), enable_gqa=q.shape[1] != k.shape[1])
    return out.unsqueeze(0)
