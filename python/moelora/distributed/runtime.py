"""Processes of a parallel engine: the launcher, rank 0's driver side, the workers' loop.

Rank 0 is the process that created LLM(..., tensor_parallel_size=N): it spawns ranks 1..N-1
(torch.multiprocessing, spawn), joins them in torch.distributed's default process group (NCCL
on CUDA, gloo on the CPU; MASTER_ADDR 127.0.0.1, a free port) and runs the scheduler. Every
rank builds the same LLMEngine over its own shard (LLMEngine(config, parallel=RankContext)).
Each step rank 0 broadcasts one message: the pool/cache calls to replay (mirror.py), the
adapter slots it used, and the step's metadata (token ids, positions, block tables, slot
mapping, token_slot) as host tensors; every rank replays, runs the forward pass on its shard
(all-reduces inside), and rank 0 alone computes logits and samples.
"""

from __future__ import annotations

import atexit
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
from moelora.distributed.loading import load_shard
from moelora.distributed.mirror import OpLog, RecordingCache, RecordingPool, Replayer
from moelora.distributed.shard import shard_model, shard_plan
from moelora.engine.model_runner import ModelRunner
from moelora.engine.paged_context import StepMetadata
from moelora.models import load_model

logger = logging.getLogger("moelora")

# Workers block in a broadcast while the server is idle: the collective timeout must not end
# them, so it is long. A dead peer is noticed by rank 0's process monitor instead.
COLLECTIVE_TIMEOUT = timedelta(days=7)


class RankContext:
    """This process's place in a parallel engine; the `parallel` argument of LLMEngine.

    The engine calls: shard_model (after loading), full_sites / shard_plan (AdapterManager:
    adapters are validated against the whole model, loaded as this rank's slice), attach (at
    the end of construction) and shutdown (LLMEngine.stop)."""

    @staticmethod
    def load_device(model: str, device: torch.device):
        """Where to build the whole model before cutting this rank's shard: the host for
        checkpoints (the GPU may not hold the whole model), this rank's GPU for synthetic models
        (random weights from the device's generator, the same as a single-GPU engine's)."""
        if model.startswith("synthetic:") and device.type == "cuda":
            return device
        return "cpu"

    def __init__(self, parallel: ParallelConfig, rank: int, processes=None):
        self.parallel = parallel
        self.rank = rank
        self.world_size = parallel.world_size
        self.processes = processes or []  # rank 0: the worker processes
        self.full_sites = []
        self.op_log = OpLog() if rank == 0 else None
        self._adapter_paths: dict[str, str] = {}
        self._closed = False

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    # -- construction hooks ------------------------------------------------------------------
    def load_model(self, config, dtype: torch.dtype, device: torch.device):
        """This rank's shard of config.model on `device`: checkpoints stream layer by layer
        (loading.py), synthetic models are built whole on the device and cut."""
        if os.path.isdir(config.model):
            model, self.full_sites = load_shard(config.model, self.parallel, self.rank, dtype,
                                                device, progress=config.load_progress
                                                and self.is_driver)
        else:
            overrides = ({"num_layers": config.synthetic_num_layers}
                         if config.synthetic_num_layers is not None else {})
            model = load_model(config.model, dtype=dtype,
                               device=self.load_device(config.model, device),
                               progress=config.load_progress, **overrides)
            model, self.full_sites = shard_model(model, self.parallel, self.rank)
            model = model.to(device)
        self._agree_on_pool_size(config, device)
        return model

    def _agree_on_pool_size(self, config, device: torch.device) -> None:
        if device.type == "cuda" and config.pool_memory_bytes is None:
            # Every rank needs the same page count: take the smallest free memory of all.
            from moelora.engine.memory import pool_bytes_for

            torch.cuda.empty_cache()
            size = torch.tensor([pool_bytes_for(config, device)], dtype=torch.int64,
                                device=device)
            dist.all_reduce(size, op=dist.ReduceOp.MIN)
            config.pool_memory_bytes = int(size.item())

    def shard_plan(self, plan):
        self._adapter_paths[plan.name] = str(plan.path)
        return shard_plan(plan, self.full_sites, self.parallel, self.rank)

    def attach(self, engine) -> None:
        pool = engine.memory.pool
        geometry = (pool.num_pages, engine.memory.page_bytes, engine.memory.block_tokens)
        everyone = [None] * self.world_size
        dist.all_gather_object(everyone, geometry)
        if len(set(everyone)) != 1:
            raise RuntimeError(f"the ranks' page pools differ (pages, page bytes, block tokens "
                               f"per rank: {everyone}); set pool_memory_bytes")
        engine.runner = ParallelModelRunner(engine.runner, self)
        if self.is_driver:
            engine.kv.pool = RecordingPool(engine.kv.pool, self.op_log)
            if engine.adapters.cache is not None:
                engine.adapters.cache = RecordingCache(engine.adapters.cache, self.op_log,
                                                       self._adapter_paths)
            atexit.register(self.shutdown)
        else:
            self.replayer = Replayer(pool, engine.adapters, self.rank)

    # -- messages ----------------------------------------------------------------------------
    def broadcast(self, message):
        box = [message]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def serve(self, engine) -> None:
        """A worker's loop: replay, forward, until rank 0 says stop."""
        while True:
            message = self.broadcast(None)
            if message[0] == "stop":
                return
            _, ops, slots, input_ids, meta = message
            self.replayer.replay(ops)
            self.replayer.check_slots(slots)
            engine.runner.forward(input_ids, meta, None)

    def shutdown(self) -> None:
        if self._closed or not self.is_driver:
            return
        self._closed = True
        atexit.unregister(self.shutdown)
        try:
            self.broadcast(("stop",))
        finally:
            for process in self.processes:
                process.join(timeout=30)
                if process.is_alive():
                    process.kill()
            if dist.is_initialized():
                dist.destroy_process_group()


class ParallelModelRunner(ModelRunner):
    """ModelRunner of one rank: metadata is built on rank 0's host and broadcast."""

    def __init__(self, runner: ModelRunner, context: RankContext):
        super().__init__(runner.model, runner.kv_view, runner.lora_views, runner.block_tokens,
                         runner.device, runner.graphs)
        self.context = context
        self._host = ModelRunner(runner.model, None, None, runner.block_tokens,
                                 torch.device("cpu"))

    @torch.inference_mode()
    def execute(self, batch, slot_of: dict[int, int]) -> torch.Tensor:
        input_ids, meta, sample_rows = self._host.build_metadata(batch, slot_of)
        slots = {s.adapter_id: slot_of[s.seq_id] for s in batch.seqs
                 if s.adapter_id is not None and s.seq_id in slot_of}
        self.context.broadcast(("step", self.context.op_log.drain(), slots, input_ids, meta))
        return self.forward(input_ids, meta, sample_rows)

    @torch.inference_mode()
    def forward(self, input_ids, meta: StepMetadata, sample_rows):
        dev = self.device
        meta = meta.to(dev)
        hidden = self.run_model(input_ids.to(dev), meta)
        if sample_rows is None:
            return None  # not rank 0: nothing to sample
        if not sample_rows:
            return torch.empty(0, self.model.config.vocab_size, device=dev)
        rows = torch.tensor(sample_rows, dtype=torch.int64, device=dev)
        return self.model.compute_logits(hidden.index_select(0, rows)).float()


# ---- launching ----------------------------------------------------------------------------


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


def _worker_main(rank: int, parallel: ParallelConfig, config, port: int) -> None:
    from moelora.engine.llm_engine import LLMEngine

    try:
        _init_group(rank, parallel.world_size, port, config.torch_device())
        context = RankContext(parallel, rank)
        engine = LLMEngine(config, parallel=context)
        context.serve(engine)
        engine.adapters.close()
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 (whatever failed: report it, exit non-zero)
        traceback.print_exc()
        os._exit(1)  # rank 0's monitor sees the exit code


def _monitor(processes, context: RankContext) -> None:
    """Rank 0 cannot go on when a worker dies (its collectives would hang): exit loudly."""
    from multiprocessing.connection import wait

    wait([p.sentinel for p in processes])
    if context._closed:
        return
    dead = [(i + 1, p.exitcode) for i, p in enumerate(processes) if not p.is_alive()]
    logger.error("moelora: parallel engine worker(s) died (rank, exit code): %s; exiting", dead)
    os._exit(1)


def launch(config, parallel: ParallelConfig | None = None) -> RankContext:
    """Spawns ranks 1..N-1 of a parallel engine for `config` and makes this process rank 0;
    pass the result as LLMEngine(config, parallel=...)."""
    parallel = parallel or ParallelConfig.from_engine_config(config)
    parallel.validate_model(model_config_of(config.model))  # fail before spawning anything
    device = config.torch_device()
    if device.type == "cuda":
        needed = (device.index or 0) + parallel.world_size
        if torch.cuda.device_count() < needed:
            raise ValueError(f"{parallel.describe()} needs GPUs {device.index or 0}.."
                             f"{needed - 1}; torch sees {torch.cuda.device_count()}")
    if dist.is_initialized():
        raise RuntimeError("a parallel moelora engine owns torch.distributed's default process "
                           "group, and one is already initialised in this process (another "
                           "parallel engine not stopped, or the application's own)")
    port = _free_port()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # inherited by the workers
    spawn = mp.get_context("spawn")
    processes = [spawn.Process(target=_worker_main, daemon=True, name=f"moelora-rank{rank}",
                               args=(rank, parallel, _rank_config(config, rank), port))
                 for rank in range(1, parallel.world_size)]
    for process in processes:
        process.start()
    context = RankContext(parallel, 0, processes)
    threading.Thread(target=_monitor, args=(processes, context), daemon=True,
                     name="moelora-rank-monitor").start()
    _init_group(0, parallel.world_size, port, device)
    return context
