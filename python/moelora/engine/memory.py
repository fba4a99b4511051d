"""Sizing and building the unified page pool for a model.

A page holds one KV block of one layer (block_tokens tokens of K and V). Adapter rows are
packed into the same pages, so a page must also hold the longest LoRA row; block_tokens is
doubled until it does. The arena is one torch allocation (Python owns memory) that the native
pool divides into pages.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from moelora import _C, ops

CPU_DEFAULT_POOL_BYTES = 512 << 20
ACTIVATION_RESERVE_BYTES = 2 << 30  # left free on the GPU for activations and the allocator


@dataclass
class EngineMemory:
    pool: object  # _C.PagePool
    arena: torch.Tensor  # uint8 [bytes], the pool's memory
    kv_view: object  # _C.KvCacheView
    block_tokens: int
    page_bytes: int


def page_geometry(block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                  longest_lora_row: int) -> tuple[int, int]:
    """(block_tokens, page_bytes) with page_bytes a multiple of 256 that fits a KV block and a
    LoRA row of `longest_lora_row` elements."""
    elem = torch.tensor([], dtype=dtype).element_size()
    row_bytes = -(-longest_lora_row * elem // 16) * 16
    block_tokens = block_size
    while 2 * block_tokens * num_kv_heads * head_dim * elem < row_bytes:
        block_tokens *= 2
    kv_bytes = 2 * block_tokens * num_kv_heads * head_dim * elem
    return block_tokens, -(-kv_bytes // 256) * 256


def pool_bytes_for(config, device: torch.device) -> int:
    if config.pool_memory_bytes is not None:
        return int(config.pool_memory_bytes)
    if device.type == "cpu":
        return CPU_DEFAULT_POOL_BYTES
    # Blocks torch caches but nothing uses (the stacks pack_for_kernels replaced at load) would
    # otherwise count as the model's memory.
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    in_use_by_others = total - free - torch.cuda.memory_reserved(device)
    budget = int(total * config.gpu_memory_utilization) - in_use_by_others
    budget -= torch.cuda.memory_reserved(device) + ACTIVATION_RESERVE_BYTES
    if budget <= 0:
        raise ValueError(f"gpu_memory_utilization={config.gpu_memory_utilization} leaves no memory "
                         f"for the KV/adapter pool after the model's weights")
    return budget


def build_pool(config, model_config, sites, dtype: torch.dtype,
               device: torch.device) -> EngineMemory:
    longest_row = max((max(s.in_dim, s.out_dim) for s in sites), default=0)
    block_tokens, page_bytes = page_geometry(config.block_size, model_config.num_kv_heads,
                                             model_config.head_dim, dtype, longest_row)
    num_bytes = pool_bytes_for(config, device)
    num_pages = num_bytes // page_bytes
    if num_pages < 1:
        raise ValueError(f"the page pool ({num_bytes} bytes) is smaller than one page "
                         f"({page_bytes} bytes)")
    arena = torch.empty(num_pages * page_bytes, dtype=torch.uint8, device=device)
    pool = _C.PagePool.from_external(arena.data_ptr(), arena.numel(), page_bytes, device.type,
                                     device.index or 0, keep_alive=arena)
    kv_view = ops.make_kv_cache_view(arena, page_bytes=page_bytes, block_tokens=block_tokens,
                                     num_kv_heads=model_config.num_kv_heads,
                                     head_dim=model_config.head_dim, dtype=dtype)
    return EngineMemory(pool, arena, kv_view, block_tokens, page_bytes)
