"""Tensor- and expert-parallel serving over torch.distributed: one process per GPU.

`LLM(model, tensor_parallel_size=N)` shards attention and MLPs over N processes (Megatron
style); `enable_expert_parallel=True` partitions the experts instead of sharding them. Rank 0
(the calling process) schedules and samples; see runtime.py for the process model, shard.py for
how weights and LoRA adapters are split, mirror.py for how the ranks' page pools and adapter
caches stay identical.

Like every spawn-based launcher, a script that creates a parallel engine must guard its entry
point with `if __name__ == "__main__":` (the workers import the main module).

Each rank builds only its shard of a checkpoint, one layer at a time (loading.py): host memory
peaks at one whole layer, device memory at the shard. Known limits: adapter loads are
synchronous in a parallel engine (no load/compute overlap);
step metadata travels as one pickled broadcast; rank 0 samples from a replicated vocab head;
no CUDA graphs. Tested on the CPU (gloo) and on 2 H200s (NCCL): tests/python/test_distributed_gpu.py.
"""

from moelora.distributed.config import ParallelConfig
from moelora.distributed.runtime import RankContext, launch

__all__ = ["ParallelConfig", "RankContext", "launch"]
