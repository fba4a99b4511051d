"""Processes of a parallel engine: rank 0 spawns ranks 1..N-1 and they serve its steps.

Rank 0 is the process that made the MultiProcExecutor (LLM(..., tensor_parallel_size=N)). It
spawns the other ranks (torch.multiprocessing, spawn) and joins them in torch.distributed's
default process group (NCCL on CUDA, gloo on the CPU; 127.0.0.1 and a free port). Each worker
builds its rank's worker (rank.py) and loops: receive rank 0's step message (the pool and
adapter-cache calls to replay, mirror.py; the adapter slots used; the step inputs), replay,
check, run the forward pass on its shard (the all-reduces inside meet rank 0's), until rank 0
says stop. A worker holds no scheduler, tokenizer or sampler: rank 0 decides and samples.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moelora.distributed.config import ParallelConfig, model_config_of
from moelora.distributed.mirror import Replayer
from moelora.distributed.rank import RankShard, broadcast, build_rank_worker, forward

logger = logging.getLogger("moelora")

# Workers block in a broadcast while the server is idle: the collective timeout must not end
# them, so it is long. A dead peer is noticed by rank 0's process monitor instead.
COLLECTIVE_TIMEOUT = timedelta(days=7)
STOP = ("stop",)


class WorkerProcesses:
    """Ranks 1..N-1 of a parallel engine for `config`, spawned from this process, which joins
    the process group as rank 0. A worker that dies takes this process down (its collectives
    would hang otherwise) unless stop() came first."""

    def __init__(self, config, parallel: ParallelConfig):
        parallel.validate_model(model_config_of(config.model, **config.synthetic_overrides()))
        device = config.torch_device()
        if device.type == "cuda":
            needed = (device.index or 0) + parallel.world_size
            if torch.cuda.device_count() < needed:
                raise ValueError(f"{parallel.describe()} needs GPUs {device.index or 0}.."
                                 f"{needed - 1}; torch sees {torch.cuda.device_count()}")
        if dist.is_initialized():
            raise RuntimeError("a parallel moelora engine owns torch.distributed's default "
                               "process group, and one is already initialised in this process "
                               "(another parallel engine not shut down, or the application's)")
        port = _free_port()
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # inherited by the workers
        spawn = mp.get_context("spawn")
        self.processes = [
            spawn.Process(target=_worker_main, daemon=True, name=f"moelora-rank{rank}",
                          args=(rank, parallel, _rank_config(config, rank), port))
            for rank in range(1, parallel.world_size)]
        self.stopped = False
        for process in self.processes:
            process.start()
        threading.Thread(target=self._monitor, daemon=True, name="moelora-rank-monitor").start()
        _init_group(0, parallel.world_size, port, device)

    def _monitor(self) -> None:
        from multiprocessing.connection import wait

        wait([p.sentinel for p in self.processes])
        if self.stopped:
            return
        dead = [(i + 1, p.exitcode) for i, p in enumerate(self.processes) if not p.is_alive()]
        logger.error("moelora: parallel engine worker(s) died (rank, exit code): %s; exiting",
                     dead)
        os._exit(1)

    def stop(self, graceful: bool = True) -> None:
        """Tells the workers to stop (graceful) or kills them, and leaves the process group."""
        if self.stopped:
            return
        self.stopped = True
        try:
            if graceful:
                broadcast(STOP)
        finally:
            for process in self.processes:
                process.join(timeout=30 if graceful else 0)
                if process.is_alive():
                    process.kill()
            if dist.is_initialized():
                dist.destroy_process_group()


def serve(worker, rank: int) -> None:
    """A worker's loop: replay rank 0's calls, run the step, until rank 0 says stop."""
    replayer = Replayer(worker.memory.pool, worker.adapters, rank)
    while True:
        message = broadcast()
        if message == STOP:
            return
        _, ops, slots, input_ids, meta = message
        replayer.replay(ops)
        replayer.check_slots(slots)
        forward(worker.runner, input_ids, meta)


def _worker_main(rank: int, parallel: ParallelConfig, config, port: int) -> None:
    try:
        _init_group(rank, parallel.world_size, port, config.torch_device())
        worker = build_rank_worker(config, RankShard(parallel, rank))
        serve(worker, rank)
        worker.release()
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 (whatever failed: report it, exit non-zero)
        traceback.print_exc()
        os._exit(1)  # rank 0's monitor sees the exit code


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_config(config, rank: int):
    """Rank `rank`'s EngineConfig: on CUDA, the GPU after rank 0's by `rank`."""
    device = config.torch_device()
    if device.type != "cuda":
        return config
    return dataclasses.replace(config, device=f"cuda:{(device.index or 0) + rank}")


def _init_group(rank: int, world_size: int, port: int, device: torch.device) -> None:
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off (see KINDS.md)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":  # NCCL collectives of objects run on the current device
        torch.cuda.set_device(torch.device("cuda", device.index or 0))
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=COLLECTIVE_TIMEOUT)


__all__ = ["WorkerProcesses", "serve"]
