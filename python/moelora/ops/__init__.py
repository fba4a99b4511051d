"""moelora kernels over torch tensors.

Thin wrappers over ``moelora._C``: they allocate outputs where the op has fixed-size outputs,
pass tensor views and the current CUDA stream, and leave every argument check to the library
(which raises ``moelora.InvalidArgument`` naming the argument). Semantics: include/moelora/ops.h.
Every kernel choice comes from a plan (plan_lora, plan_attention; include/moelora/plan.h). One
module per op family: align, lora, attention, and the plan.
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
    LoraSiteView,
    dense_lora,
    fused_moe_lora,
    fused_moe_lora_unsorted,
    make_site_view,
)
from moelora.ops.plan import (
    AttentionPlan,
    DeviceProps,
    LoraPlan,
    PlanOverrides,
    device_props,
    plan_attention,
    plan_lora,
)

__all__ = [
    "AttentionPlan",
    "DeviceProps",
    "KvCacheView",
    "LoraPlan",
    "LoraSiteView",
    "PlanOverrides",
    "dense_lora",
    "device_props",
    "fused_moe_lora",
    "fused_moe_lora_unsorted",
    "kv_cache_pages",
    "kv_cache_write",
    "kv_page_bytes_needed",
    "make_kv_cache_view",
    "make_site_view",
    "moe_lora_align",
    "moe_lora_align_max_blocks",
    "paged_attention",
    "plan_attention",
    "plan_lora",
]
