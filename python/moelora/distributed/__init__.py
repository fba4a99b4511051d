"""Tensor- and expert-parallel serving over torch.distributed: one process per GPU.

`LLM(model, tensor_parallel_size=N)` shards attention and MLPs over N processes (Megatron
style); `enable_expert_parallel=True` partitions the experts instead of sharding them. The
engine is handed a MultiProcExecutor (executor.py): this process is rank 0, which schedules and
samples; runtime.py spawns and runs the other ranks, rank.py builds every rank's worker,
shard.py splits weights (dense or quantized expert stacks) and LoRA adapters, mirror.py keeps
the ranks' page pools and adapter caches identical, loading.py streams a checkpoint's shard.

Each rank builds only its shard of a checkpoint, one layer at a time: host memory peaks at one
whole layer, device memory at the shard. Like every spawn-based launcher, a script that creates
a parallel engine must guard its entry point with `if __name__ == "__main__":`.
"""

from moelora.distributed.config import ParallelConfig
from moelora.distributed.executor import MultiProcExecutor, executor_for

__all__ = ["MultiProcExecutor", "ParallelConfig", "executor_for"]
