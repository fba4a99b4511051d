"""MultiProcExecutor: the executor of a parallel engine, one process per GPU.

This process is rank 0: it spawns the other ranks (runtime.py), builds its own worker like
theirs (rank.py) and drives them. Its page pool and adapter cache record every call the engine's
scheduler makes (mirror.py); each step broadcasts the recorded calls, the adapter slots used and
the step's inputs, built once on the host; every rank replays the calls and runs the forward
pass on its shard; rank 0 alone computes logits (the vocab head is replicated).

Known limits: adapter loads are synchronous (no load/compute overlap across ranks); the step
inputs travel as one pickled broadcast; decode graphs only when asked for
(EngineConfig.decode_graphs=True: each rank captures its steps, collectives included).
Tested on the CPU (gloo, tests/python/test_distributed.py) and on 2 GPUs (NCCL,
tests/python/test_distributed_gpu.py).
"""

from __future__ import annotations

import atexit

import torch

from moelora.distributed.config import ParallelConfig
from moelora.distributed.mirror import OpLog, RecordingCache, RecordingPool
from moelora.distributed.rank import RankShard, broadcast, build_rank_worker, forward
from moelora.distributed.runtime import WorkerProcesses
from moelora.engine.executor import Executor, UniProcExecutor
from moelora.engine.model_runner import ModelRunner


class MultiProcExecutor(Executor):
    """Rank 0 of `parallel` (default: tensor parallel over config.tensor_parallel_size
    processes, experts partitioned if config.enable_expert_parallel). Like every spawn-based
    launcher, a script that makes one must guard its entry point with
    `if __name__ == "__main__":` (the workers import the main module)."""

    def __init__(self, config, parallel: ParallelConfig | None = None):
        self.parallel = parallel or ParallelConfig.from_engine_config(config)
        self.config = config
        self._closed = False
        self.workers = WorkerProcesses(config, self.parallel)  # validates the split first
        try:
            self.shard = RankShard(self.parallel, 0)
            self.op_log = OpLog()
            self.worker = build_rank_worker(config, self.shard, cache_proxy=lambda cache:
                                            RecordingCache(cache, self.op_log,
                                                           self.shard.adapter_paths))
        except BaseException:
            self.workers.stop(graceful=False)
            raise
        atexit.register(self.shutdown)
        worker = self.worker
        self.device, self.dtype = worker.device, worker.dtype
        self.model, self.memory = worker.model, worker.memory
        self.adapters, self.runner = worker.adapters, worker.runner
        self.kv_pool = RecordingPool(self.memory.pool, self.op_log)
        self.full_sites = self.shard.full_sites
        # Builds each step's inputs on the host, where they are pickled for the broadcast.
        self._host_inputs = ModelRunner(self.model, None, None, self.memory.block_tokens,
                                        torch.device("cpu"))

    @torch.inference_mode()
    def execute(self, batch, slot_of: dict[int, int]) -> torch.Tensor:
        input_ids, meta, sample_rows = self._host_inputs.build_metadata(batch, slot_of)
        slots = {s.adapter_id: slot_of[s.seq_id] for s in batch.seqs
                 if s.adapter_id is not None and s.seq_id in slot_of}
        broadcast(("step", self.op_log.drain(), slots, input_ids, meta))
        hidden = forward(self.runner, input_ids, meta)
        if not sample_rows:
            return torch.empty(0, self.model.config.vocab_size, device=self.device)
        rows = torch.tensor(sample_rows, dtype=torch.int64, device=hidden.device)
        return self.model.compute_logits(hidden.index_select(0, rows)).float()

    def shutdown(self) -> None:
        """Stops the other ranks, leaves the process group and frees this rank's worker."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.shutdown)
        try:
            self.workers.stop()
        finally:
            self.worker.release()
            self._host_inputs.release()
            self.model = self.memory = self.kv_pool = None


def executor_for(config) -> Executor:
    """The executor `config` asks for: one process for tensor_parallel_size 1, else one per
    GPU."""
    if config.tensor_parallel_size == 1:
        return UniProcExecutor(config)
    return MultiProcExecutor(config)


__all__ = ["MultiProcExecutor", "executor_for"]
