"""Which of the requested training kernels a run uses on its device."""
from __future__ import annotations

from typing import Sequence

# On CUDA the standard kernels (cuBLAS, bitsandbytes, flash attention) are used; of these kernels
# only packed attention applies there (it calls flash varlen attention on CUDA).
CUDA_KERNELS = frozenset({"packed_attention"})


def kernels_for(requested: Sequence[str], device_type: str, sharded: bool) -> tuple[str, ...]:
    """``requested`` less the kernels that do not apply: on CUDA all but packed attention; under
    FSDP or ZeRO-3 lora_siblings, which stacks weights that sharding then splits again."""
    used = [k for k in requested if device_type == "cpu" or k in CUDA_KERNELS]
    return tuple(k for k in used if not (sharded and k == "lora_siblings"))
