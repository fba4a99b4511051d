"""Executors: what runs the model for the engine.

The engine (requests, scheduler, sampler) decides what runs; its executor runs it. An executor
owns the workers, each a model (or its shard) with its page pool, adapter cache and model
runner, and offers the engine:

  execute(batch, slot_of)  float32 logits [sampling sequences, vocab] of one scheduled step
  adapters                 the AdapterManager: register, load, unload, pin adapters (its calls
                           reach every worker)
  kv_pool                  the page pool the engine's KV manager allocates from
  memory, model, runner    the driving worker's, for pool stats, the vocabulary and counters
  full_sites               the whole model's LoRA sites: the shapes adapters are written for
  shutdown()               frees everything the workers hold (idempotent)

UniProcExecutor runs one worker in this process. moelora.distributed.MultiProcExecutor runs one
process per GPU over torch.distributed; the engine is handed one and never imports it.
"""

from __future__ import annotations

import json
import os

import torch
from moelora.engine.adapters import AdapterManager
from moelora.engine.memory import build_pool
from moelora.engine.model_runner import ModelRunner
from moelora.engine.step_graphs import StepGraphs, default_buckets
from moelora.engine.warmup import warm_up_engine
from moelora.models import load_model


class Worker:
    """One device's serving state: a model (or its shard), the unified page pool sized for it,
    the adapter cache over that pool and the model runner (with its step graphs)."""

    def __init__(self, config, model, dtype: torch.dtype, device: torch.device, *,
                 decode_graphs: bool, adapter_shard=None, cache_proxy=None):
        self.model, self.dtype, self.device = model, dtype, device
        mc = model.config
        sites = model.lora_sites() if config.enable_lora else []
        self.memory = build_pool(config, mc, sites, dtype, device)
        self.adapters = AdapterManager(config, self.memory, sites, mc, dtype,
                                       shard=adapter_shard, cache_proxy=cache_proxy)
        graphs = None
        if decode_graphs:
            graphs = StepGraphs(model, self.memory.kv_view, self.adapters.views, mc.num_layers,
                                self.memory.block_tokens, config.decode_graph_max_blocks,
                                default_buckets(config.max_num_seqs,
                                                config.max_cudagraph_capture_size), device)
        self.runner = ModelRunner(model, self.memory.kv_view, self.adapters.views,
                                  self.memory.block_tokens, device, graphs,
                                  max_rows=config.max_num_seqs)
        if graphs is not None:
            graphs.capture_all()  # after the runner attached its block tables
        self.warmup_passes = warm_up_engine(self.runner, config)

    def release(self) -> None:
        """Frees the step graphs, the adapter cache (threads, host copies), the pool and the
        model; the runner and the adapter manager stay, closed, for their counters."""
        self.runner.release()
        self.adapters.close()
        self.model = self.memory = None


class Executor:
    """The interface the engine drives (see the module docstring)."""

    config = None  # the EngineConfig it was built for
    device: torch.device
    dtype: torch.dtype
    model = None
    memory = None  # EngineMemory of the driving worker
    kv_pool = None
    adapters: AdapterManager
    runner: ModelRunner
    full_sites: list

    def execute(self, batch, slot_of: dict[int, int]) -> torch.Tensor:
        raise NotImplementedError

    def shutdown(self) -> None:
        raise NotImplementedError


class UniProcExecutor(Executor):
    """One worker in this process, on config.device."""

    def __init__(self, config):
        if config.tensor_parallel_size != 1:
            raise ValueError(f"tensor_parallel_size={config.tensor_parallel_size} runs one "
                             f"process per GPU: hand the engine a "
                             f"moelora.distributed.MultiProcExecutor (LLM(...) and `moelora "
                             f"serve` choose it themselves)")
        self.config = config
        self.device = config.torch_device()
        self.dtype = config.torch_dtype(checkpoint_dtype(config.model))
        model = load_model(config.model, dtype=self.dtype, device=self.device,
                           progress=config.load_progress, **config.synthetic_overrides())
        self.full_sites = model.lora_sites()
        # Default: step graphs on for a CUDA engine (vLLM's default), off elsewhere.
        graphs = (config.decode_graphs if config.decode_graphs is not None
                  else self.device.type == "cuda")
        self.worker = Worker(config, model, self.dtype, self.device, decode_graphs=graphs)
        self.model, self.memory = model, self.worker.memory
        self.adapters, self.runner = self.worker.adapters, self.worker.runner
        self.kv_pool = self.memory.pool
        # The step's one call goes straight to the runner: no layer in between.
        self.execute = self.runner.execute

    def shutdown(self) -> None:
        self.worker.release()
        self.model = self.memory = self.kv_pool = None


def checkpoint_dtype(model: str) -> torch.dtype | None:
    """The dtype the config.json of checkpoint directory `model` declares, if any."""
    if not os.path.isdir(model):
        return None
    try:
        with open(os.path.join(model, "config.json")) as f:
            hf = json.load(f)
    except (OSError, ValueError):
        return None
    name = hf.get("dtype") or hf.get("torch_dtype")
    return getattr(torch, name, None) if isinstance(name, str) else None


__all__ = ["Executor", "UniProcExecutor", "Worker", "checkpoint_dtype"]
