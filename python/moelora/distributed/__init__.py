"""Tensor- and expert-parallel serving over torch.distributed: one process per GPU.

`LLM(model, tensor_parallel_size=N)` shards attention and MLPs over N processes (Megatron
style); `enable_expert_parallel=True` partitions the experts instead of sharding them. Rank 0
(the calling process) schedules and samples; see runtime.py for the process model, shard.py for
how weights and LoRA adapters are split, mirror.py for how the ranks' page pools and adapter
caches stay identical.
"""

from moelora.distributed.config import ParallelConfig
from moelora.distributed.runtime import RankContext, launch

__all__ = ["ParallelConfig", "RankContext", "launch"]
