"""The engine side of `moelora bench adapters` (see adapters.py): an AdapterManager over a page
pool sized for the adapters, for the model's shapes without its weights, and the two timed load
paths through it. Every load registers the adapters under fresh names, so nothing is resident
or cached on the host when it starts."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from moelora.bench.records import device_fields

_POOL_SLACK = 1.5  # pages hold whole rows: room for the part of a page no row fits
_POOL_EXTRA_BYTES = 64 << 20


class AdapterLoads:
    def __init__(self, args, adapter_dir: str):
        from moelora.bench.memory_check import engine_dtype, lora_sites_of, model_config_of
        from moelora.bench.synthetic_adapters import write_adapters
        from moelora.bench.weight_bytes import adapter_bytes
        from moelora.engine.adapters import AdapterManager
        from moelora.engine.config import EngineConfig
        from moelora.engine.memory import build_pool

        self.args = args
        model_config = model_config_of(args.model, args.num_layers)
        sites = lora_sites_of(args.model, args.num_layers)
        self.dtype = engine_dtype(args.model, args.dtype, args.device)
        elem = torch.tensor([], dtype=self.dtype).element_size()
        pool_bytes = int(_POOL_SLACK * args.num_adapters *
                         adapter_bytes(model_config, args.rank, elem)) + _POOL_EXTRA_BYTES
        config = EngineConfig(model=args.model, dtype=args.dtype, device=args.device,
                              enable_lora=True, max_lora_rank=args.rank,
                              max_loras=args.num_adapters, max_cpu_loras=args.num_adapters,
                              adapter_load_threads=args.threads, pool_memory_bytes=pool_bytes)
        self.device = config.torch_device()
        self.num_layers = model_config.num_layers
        self.fields = {**device_fields(self.device),
                       "dtype": str(self.dtype).removeprefix("torch.")}
        paths = write_adapters(adapter_dir, args.num_adapters, sites, args.rank, seed=args.seed,
                               device=self.device)
        self.paths = paths
        self.files = [os.path.join(p, "adapter_model.safetensors") for p in paths]
        memory = build_pool(config, model_config, sites, self.dtype, self.device)
        self.manager = AdapterManager(config, memory, sites, model_config, self.dtype)
        self._names: list[str] = []
        self._next_id = 1

    def _register(self) -> list[int]:
        """Registers every adapter under a fresh name (after unloading the previous ones)."""
        from moelora import LoRARequest

        self._unload()
        ids = []
        for path in self.paths:
            request = LoRARequest(f"load{self._next_id}", self._next_id, path)
            self._next_id += 1
            ids.append(self.manager.resolve(request))
            self._names.append(request.lora_name)
        return ids

    def _to_device(self, ids: list[int]) -> None:
        cache = self.manager.cache
        for adapter_id in ids:
            cache.prefetch(adapter_id)
        for adapter_id in ids:
            cache.wait(adapter_id)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def cold(self) -> tuple[float, int]:
        """(seconds for register + prefetch + wait of every adapter, from cold, the previous
        round's adapters unloaded before the clock starts: freeing them is not a load; how many
        of the loads streamed, their device copies queued block by block beside the read)."""
        self._unload()
        streamed_before = self.manager.cache.stats()["device_loads_streamed"]
        start = time.perf_counter()
        ids = self._register()
        self._to_device(ids)
        seconds = time.perf_counter() - start
        return seconds, self.manager.cache.stats()["device_loads_streamed"] - streamed_before

    def split(self) -> tuple[float, float, int]:
        """(seconds disk -> host, seconds host -> device, packed host bytes), from cold; the
        registration is not timed."""
        ids = self._register()
        cache = self.manager.cache
        start = time.perf_counter()
        with ThreadPoolExecutor(self.args.threads) as pool:
            list(pool.map(cache.load_host, ids))
        to_host = time.perf_counter() - start
        host_bytes = int(cache.stats()["host_bytes"])
        start = time.perf_counter()
        self._to_device(ids)
        return to_host, time.perf_counter() - start, host_bytes

    def _unload(self) -> None:
        for name in self._names:
            self.manager.unload(name)
        self._names = []

    def close(self) -> None:
        self._unload()
        self.manager.close()
