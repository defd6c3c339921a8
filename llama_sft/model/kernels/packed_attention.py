"""Attention over padding-free packed rows, one causal SDPA call per packed example."""
from __future__ import annotations

import functools

PACKED_ATTENTION = "sdpa_packed"


@functools.cache
def packed_attention() -> str:
    """Register (once) and name the attention that training uses on packed rows.

    Given ``cu_seq_lens_q`` (the boundaries ``data.collate.pack_collate`` passes), it runs causal
    SDPA on each packed example alone instead of one L x L block-diagonal mask over the whole row,
    so no work goes to the masked-out blocks; on CPU it computes in fp32, where SDPA's kernel is
    faster than in bf16. The examples are cut out with ``split``, whose backward is one ``cat``
    (a slice per example would fill a row-long zero tensor in each slice's backward). Without
    the boundaries (evaluation, generation, padded batches) it is transformers' own SDPA, mask
    and all. benchmarks/README.md has the measurements behind these choices.
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
