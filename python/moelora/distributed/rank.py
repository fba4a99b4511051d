"""One rank of a parallel engine: its shard of the model and of every adapter, and its worker.

Rank 0 (executor.py) and ranks 1..N-1 (runtime.py) build their workers with the same calls in
the same order, collectives included (build_rank_worker), and run each step's forward pass the
same way (forward), from the step inputs rank 0 broadcasts.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from moelora.distributed.config import ParallelConfig
from moelora.distributed.loading import load_shard
from moelora.distributed.shard import shard_model, shard_plan
from moelora.engine.executor import Worker, checkpoint_dtype
from moelora.engine.memory import pool_bytes_for
from moelora.engine.paged_context import StepMetadata
from moelora.models import load_model


class RankShard:
    """Which shard of the model and of every adapter this rank holds; the AdapterManager's
    `shard` (adapters are validated against full_sites and loaded as shard_plan cuts them)."""

    def __init__(self, parallel: ParallelConfig, rank: int):
        self.parallel = parallel
        self.rank = rank
        self.full_sites = []  # the whole model's LoRA sites, known once the model is loaded
        self.adapter_paths: dict[str, str] = {}  # adapter name -> PEFT directory

    def load_model(self, config, dtype: torch.dtype, device: torch.device):
        """This rank's shard of config.model on `device`: checkpoints stream layer by layer
        (loading.py); synthetic models are built whole and cut, on this rank's GPU (random
        weights from the device's generator, the same as a one-GPU engine's) or the host."""
        if os.path.isdir(config.model):
            model, self.full_sites = load_shard(config.model, self.parallel, self.rank, dtype,
                                                device, progress=config.load_progress
                                                and self.rank == 0)
            return model
        model = load_model(config.model, dtype=dtype, device=device,
                           progress=config.load_progress, **config.synthetic_overrides())
        model, self.full_sites = shard_model(model, self.parallel, self.rank)
        return model

    def shard_plan(self, plan):
        self.adapter_paths[plan.name] = str(plan.path)
        return shard_plan(plan, self.full_sites, self.parallel, self.rank)


def build_rank_worker(config, shard: RankShard, cache_proxy=None) -> Worker:
    """This rank's worker: its model shard, a page pool of the same geometry on every rank, its
    adapter cache and runner (decode graphs only when config.decode_graphs is True)."""
    device = config.torch_device()
    dtype = config.torch_dtype(checkpoint_dtype(config.model))
    model = shard.load_model(config, dtype, device)
    _agree_on_pool_size(config, device)
    worker = Worker(config, model, dtype, device, decode_graphs=bool(config.decode_graphs),
                    adapter_shard=shard, cache_proxy=cache_proxy)
    memory = worker.memory
    geometry = (memory.pool.num_pages, memory.page_bytes, memory.block_tokens)
    everyone = [None] * shard.parallel.world_size
    dist.all_gather_object(everyone, geometry)
    if len(set(everyone)) != 1:
        worker.release()
        raise RuntimeError(f"the ranks' page pools differ (pages, page bytes, block tokens per "
                           f"rank: {everyone}); set pool_memory_bytes")
    return worker


def _agree_on_pool_size(config, device: torch.device) -> None:
    if device.type == "cuda" and config.pool_memory_bytes is None:
        # Every rank needs the same page count: take the smallest free memory of all.
        torch.cuda.empty_cache()
        size = torch.tensor([pool_bytes_for(config, device)], dtype=torch.int64, device=device)
        dist.all_reduce(size, op=dist.ReduceOp.MIN)
        config.pool_memory_bytes = int(size.item())


def broadcast(message=None):
    """Rank 0's `message` on every rank (one pickled broadcast)."""
    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@torch.inference_mode()
def forward(runner, input_ids: torch.Tensor, meta: StepMetadata) -> torch.Tensor:
    """Final hidden states of a step whose inputs were built on rank 0's host."""
    device = runner.device
    return runner.run_model(input_ids.to(device), meta.to(device))


__all__ = ["RankShard", "broadcast", "build_rank_worker", "forward"]
