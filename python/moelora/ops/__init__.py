"""moelora kernels over torch tensors.

Thin wrappers over ``moelora._C``: they allocate outputs where the op has fixed-size outputs,
pass tensor views and the current CUDA stream, and leave every argument check to the library
(which raises ``moelora.InvalidArgument`` naming the argument). Semantics: include/moelora/ops.h.
One module per op family: align, lora, attention.
"""

from moelora.ops.align import moe_lora_align, moe_lora_align_max_blocks
from moelora.ops.attention import (
    KvCacheView,
    kv_cache_pages,
    kv_cache_write,
    kv_page_bytes_needed,
    make_kv_cache_view,
    paged_attention,
)
from moelora.ops.lora import (
    GROUPED_BLOCK_M_LARGE,
    GROUPED_BLOCK_M_SMALL,
    GROUPED_FROM_PAIRS,
    GROUPED_LARGE_BLOCK_PAIRS_PER_GROUP,
    GROUPED_MIN_PAIRS_PER_EXPERT,
    GROUPED_MIN_PAIRS_PER_GROUP,
    UNSORTED_MAX_DENSE_ROWS,
    LoraSiteView,
    dense_lora,
    fused_moe_lora,
    fused_moe_lora_unsorted,
    grouped_block_m,
    make_site_view,
    prefer_unsorted,
)

__all__ = [
    "GROUPED_BLOCK_M_LARGE",
    "GROUPED_BLOCK_M_SMALL",
    "GROUPED_FROM_PAIRS",
    "GROUPED_LARGE_BLOCK_PAIRS_PER_GROUP",
    "GROUPED_MIN_PAIRS_PER_EXPERT",
    "GROUPED_MIN_PAIRS_PER_GROUP",
    "UNSORTED_MAX_DENSE_ROWS",
    "KvCacheView",
    "LoraSiteView",
    "dense_lora",
    "fused_moe_lora",
    "fused_moe_lora_unsorted",
    "grouped_block_m",
    "kv_cache_pages",
    "kv_cache_write",
    "kv_page_bytes_needed",
    "make_kv_cache_view",
    "make_site_view",
    "moe_lora_align",
    "moe_lora_align_max_blocks",
    "paged_attention",
    "prefer_unsorted",
]
