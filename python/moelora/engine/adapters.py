"""Adapters as the engine sees them: vLLM's LoRARequest, and the AdapterManager that registers
PEFT directories with the native adapter cache (disk -> host -> device tiers), starts their
loads as requests arrive, tells the cache which adapters queued requests wait for (in queue
order), pins them while requests run, exposes the row tables to the kernels and the load
metrics to the server."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import torch
from moelora import _C
from moelora._tensor import dtype_code
from moelora.lora import AdapterValidationError, load_adapter_plan

RESIDENT = _C.Residency.DEVICE
FAILED = _C.Residency.FAILED
# Where an adapter was when a request for it arrived (the "hits" of AdapterManager.metrics()).
_ARRIVAL_TIER = {_C.Residency.DEVICE: "device", _C.Residency.HOST: "host",
                 _C.Residency.LOADING: "loading", _C.Residency.DISK: "disk",
                 _C.Residency.WAITING_FOR_MEMORY: "host", _C.Residency.FAILED: "failed"}


@dataclass(frozen=True)
class LoRARequest:
    """vLLM's LoRARequest: a name, a positive integer id and a PEFT directory."""

    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    base_model_name: str | None = None

    def __post_init__(self) -> None:
        if not self.lora_name:
            raise ValueError("LoRARequest needs a non-empty lora_name")
        if not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be a positive integer, got {self.lora_int_id!r}")

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def path(self) -> str:
        return self.lora_path


_AUTO_RESERVE_CAP = 16 << 30
_AUTO_RESERVE_MEMORY_SHARE = 8  # at most this fraction (1/8) of the machine's memory


def physical_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def host_reserve_bytes(config, sites, dtype) -> int:
    """EngineConfig.adapter_host_reserve_bytes, with None resolved: one largest adapter (rank
    max_lora_rank on every site, in the model dtype) per device slot (at least one per load
    thread), at most 16 GiB and an eighth of the machine's memory (shared by the processes of a
    parallel engine). A burst of cold adapters as
    large as the device slots then finds its host memory faulted in and page-locked: a load
    that page-locks its own blocks takes 2-5x as long (docs/performance.md, "Adapter loads and
    many adapters"). 0 where the largest adapter is smaller than one block: the reserve is made
    of whole blocks, and a copy smaller than a block gets its own allocation."""
    if config.adapter_host_reserve_bytes is not None:
        return config.adapter_host_reserve_bytes
    block = config.adapter_host_block_bytes
    element_bytes = torch.empty((), dtype=dtype).element_size()
    largest = sum(s.num_layers * s.num_experts * config.max_lora_rank * (s.in_dim + s.out_dim)
                  for s in sites) * element_bytes
    if block == 0 or largest < block:
        return 0
    adapters = max(config.device_lora_slots, config.adapter_load_threads)
    share = _AUTO_RESERVE_MEMORY_SHARE * max(1, config.tensor_parallel_size)
    cap = min(_AUTO_RESERVE_CAP, physical_memory_bytes() // share)
    return min(cap, largest * adapters)


class LoraViews:
    """The kernels' view of every (site, layer): LoraSiteView objects over the row tables."""

    def __init__(self, cache, sites, num_slots: int):
        self.num_slots = num_slots
        self.num_experts = max((s.num_experts for s in sites), default=1)
        self._views = {}
        for index, site in enumerate(sites):
            for layer in range(site.num_layers):
                self._views[(site.name, layer)] = cache.site_view(index, layer)
        self._names = {s.name for s in sites}

    def has_site(self, name: str) -> bool:
        return name in self._names

    def view(self, site: str, layer: int):
        return self._views[(site, layer)]


class AdapterManager:
    def __init__(self, config, memory, sites, model_config, dtype, shard=None, cache_proxy=None):
        self.config = config
        self.sites = list(sites)
        # A rank of a parallel engine (moelora.distributed.RankShard): `sites` are this rank's
        # shard; adapters are validated against shard.full_sites and loaded as this rank's
        # slice (shard.shard_plan). None: one process.
        self.shard = shard
        self.family = model_config.family
        self._lock = threading.Lock()
        self._ids: dict[str, int] = {}  # adapter name -> native id
        self._requests: dict[str, LoRARequest] = {}
        self._registrations = 0
        self._registration_seconds = 0.0
        self._arrivals = dict.fromkeys(("device", "host", "loading", "disk", "failed"), 0)
        self.cache = None
        self.copies = None
        self.views = None
        if not config.enable_lora:
            return
        pool = memory.pool
        if pool.device == "cuda":
            self.copies = _C.make_cuda_copy_engine(pool.device_index, 2)
        else:
            self.copies = _C.make_cpu_copy_engine()
        native_sites = [_C.LoraSite(name=s.name, num_layers=s.num_layers,
                                    num_experts=s.num_experts, in_dim=s.in_dim, out_dim=s.out_dim)
                        for s in self.sites]
        self.cache = _C.AdapterCache(pool, self.copies, sites=native_sites,
                                     max_loras=config.device_lora_slots,
                                     max_lora_rank=config.max_lora_rank,
                                     max_cpu_loras=config.max_cpu_loras, max_cpu_bytes=0,
                                     dtype=dtype_code(dtype),
                                     host_threads=config.adapter_load_threads,
                                     pack_threads=config.adapter_pack_threads,
                                     host_block_bytes=config.adapter_host_block_bytes,
                                     host_reserve_bytes=host_reserve_bytes(config, self.sites,
                                                                           dtype))
        self.views = LoraViews(self.cache, self.sites, config.device_lora_slots)
        if cache_proxy is not None:  # e.g. rank 0 of a parallel engine records the calls
            self.cache = cache_proxy(self.cache)

    # -- registration ------------------------------------------------------------------------
    def resolve(self, request: LoRARequest) -> int:
        """The native id of `request`'s adapter, registering it on first use. Bad adapters are
        refused here (AdapterValidationError), before any request of theirs runs.

        Safe to call from any thread: the adapter is parsed and checked without the manager's
        lock (a slow parse never holds up the engine thread), then registered under it; of two
        racing registrations of one name, one registers and the other gets its id."""
        if self.cache is None:
            raise ValueError(f"adapter '{request.lora_name}' requested but the engine was "
                             f"started without enable_lora=True")
        with self._lock:
            known = self._known(request)
        if known is not None:
            return known
        start = time.perf_counter()
        plan = load_adapter_plan(request.lora_path,
                                 self.sites if self.shard is None else self.shard.full_sites,
                                 self.family, name=request.lora_name,
                                 max_lora_rank=self.config.max_lora_rank)
        if self.shard is not None:
            plan = self.shard.shard_plan(plan)
        spec = _native_spec(plan, self.sites)
        with self._lock:
            known = self._known(request)
            if known is not None:
                return known
            try:
                adapter_id = self.cache.register_adapter(spec)
            except _C.AdapterError as e:  # e.g. a file gone between parsing and registering
                raise AdapterValidationError(request.lora_name, _problem(e, request)) from None
            self._ids[request.lora_name] = adapter_id
            self._requests[request.lora_name] = request
            self._registrations += 1
            self._registration_seconds += time.perf_counter() - start
            return adapter_id

    def registered(self, request: LoRARequest) -> bool:
        """Whether an adapter of `request`'s name is registered: resolve() then parses
        nothing."""
        with self._lock:
            return request.lora_name in self._requests

    def _known(self, request: LoRARequest) -> int | None:
        known = self._requests.get(request.lora_name)
        if known is None:
            return None
        if request.lora_path and known.lora_path != request.lora_path:
            raise ValueError(f"adapter name '{request.lora_name}' is already loaded "
                             f"from another path")
        return self._ids[request.lora_name]

    def preload(self, request: LoRARequest) -> int:
        """Registers the adapter, reads and checks every weight (NaN, Inf, files changed since
        they were parsed), then loads it onto the device and waits, as vLLM's eager loading does.
        Raises AdapterValidationError naming the adapter (and the tensor or file) for an adapter
        that cannot be served; such an adapter is unregistered, so it never shows in loaded().
        An adapter that is valid but finds no free slot or pages yet stays registered and loads
        once memory frees up. Preloading an adapter that failed reloads it from its files.
        Safe to call from any thread."""
        with self._lock:
            known = self._ids.get(request.lora_name)
        if known is not None and self.cache.residency(known) == FAILED:
            self._forget_failed(request.lora_name, known)
        adapter_id = self.resolve(request)
        try:
            if self.cache.residency(adapter_id) not in (RESIDENT, _C.Residency.HOST):
                self.cache.load_host(adapter_id)
            self.cache.prefetch(adapter_id)
            self.cache.wait(adapter_id)
        except _C.PoolExhausted:
            pass
        except (_C.AdapterError, _C.Cancelled) as e:
            self._forget_failed(request.lora_name, adapter_id)
            raise AdapterValidationError(request.lora_name, _problem(e, request)) from None
        return adapter_id

    def preload_all(self, requests, up_to: int | None = None) -> dict[str, str]:
        """Eager start-up load (the server's --lora-modules): registers every adapter, reads
        them all into the host tier at once (as many as it holds) and loads the first `up_to`
        (default and at most: the device slots) onto the device, waiting for all of it.

        Every adapter is tried; those that cannot be served are unregistered and the first of
        them raises AdapterValidationError (naming the adapter and the tensor or file) once the
        others are loaded. Returns each adapter's tier: "device", "host" or "disk" (past the
        host tier's size, or no slot or pages free). Safe to call from any thread."""
        requests = list(requests)
        slots = self.config.device_lora_slots
        up_to = slots if up_to is None else max(0, min(up_to, slots))
        errors: list[AdapterValidationError] = []
        ids: dict[str, int] = {}
        for request in requests:
            try:
                ids[request.lora_name] = self.resolve(request)
            except AdapterValidationError as error:
                errors.append(error)
        names = list(ids)
        host_room = max(up_to, self.config.max_cpu_loras)
        for index, name in enumerate(names):  # every read starts before the first wait
            if index < up_to:
                self.cache.prefetch(ids[name])
            elif index < host_room:
                self.cache.prefetch_host(ids[name])
        for index, name in enumerate(names):
            try:
                if index < up_to:
                    self.cache.wait(ids[name])
                elif index < host_room:
                    self.cache.load_host(ids[name])
            except _C.PoolExhausted:
                pass  # valid; it loads when memory frees up
            except (_C.AdapterError, _C.Cancelled) as e:
                self._forget_failed(name, ids[name])
                errors.append(AdapterValidationError(name, _problem_of(e, name)))
        if errors:
            raise errors[0]
        tiers = {RESIDENT: "device", _C.Residency.HOST: "host"}
        return {name: tiers.get(self.cache.residency(ids[name]), "disk") for name in names}

    def _forget_failed(self, name: str, adapter_id: int) -> None:
        with self._lock:
            if self._ids.get(name) != adapter_id:
                return  # unloaded (or replaced) meanwhile
            del self._ids[name]
            del self._requests[name]
        try:
            self.cache.unregister(adapter_id)
        except _C.MoeloraError:
            pass  # already gone, or pinned by a running request: it goes with unload()

    def unload(self, name: str) -> None:
        with self._lock:
            adapter_id = self._ids.pop(name, None)
            self._requests.pop(name, None)
        if adapter_id is None:
            raise KeyError(f"adapter '{name}' is not loaded")
        self.cache.unregister(adapter_id)

    def loaded(self) -> list[LoRARequest]:
        """The adapters that can serve requests (failed ones are left out)."""
        with self._lock:
            entries = [(self._ids[name], request) for name, request in self._requests.items()]
        return [request for adapter_id, request in entries
                if self.cache.residency(adapter_id) != FAILED]

    # -- the scheduler's view ----------------------------------------------------------------
    def request_arrived(self, adapter_id: int, to_device: bool = True) -> None:
        """A request for the adapter was queued: counts where the adapter was (device, host,
        on its way, disk) and starts its load at once, so that it overlaps the steps of the
        requests ahead of it: onto the device, or with `to_device=False` (far back in the
        queue) into host memory only."""
        tier = _ARRIVAL_TIER.get(self.cache.residency(adapter_id), "disk")
        with self._lock:
            self._arrivals[tier] += 1
        if tier == "failed":
            return
        self.cache.note_request(adapter_id)  # popularity and recency: often-asked adapters stay
        if tier == "device":
            return
        if to_device:
            # On the cache's starter thread: the step does not wait for the load's start
            # (pages, row table, queueing the copy).
            self.cache.prefetch(adapter_id, background=True)
        else:
            self.cache.prefetch_host(adapter_id)

    def set_demand(self, queued_adapters: list[int]) -> None:
        """The adapters queued requests wait for, most urgent first: loads start in this order
        and a resident adapter in it is evicted only for one ahead of it (see the native
        AdapterCache::set_demand)."""
        if self.cache is not None:
            self.cache.set_demand(queued_adapters, background=True)

    def num_pages(self, adapter_id: int) -> int:
        """Pool pages the adapter occupies when resident."""
        return self.cache.num_pages(adapter_id)

    def waiting_for_memory(self) -> bool:
        """Whether some adapter load waits for pool pages."""
        return self.cache is not None and self.cache.stats()["waiting_for_memory"] > 0

    def ready(self, adapter_id: int) -> bool:
        return self.cache.residency(adapter_id) == RESIDENT

    def waiting_for_slot(self, adapter_id: int) -> bool:
        """Whether the adapter's load waits for a device slot or pages (not for its read)."""
        return self.cache.residency(adapter_id) == _C.Residency.WAITING_FOR_MEMORY

    def failure(self, adapter_id: int) -> str | None:
        if self.cache.residency(adapter_id) == FAILED:
            return self.cache.error_message(adapter_id)
        return None

    def pin(self, adapter_id: int) -> bool:
        try:
            self.cache.acquire(adapter_id)
        except _C.MoeloraError:
            return False  # evicted between ready() and now: try again next step
        return True

    def unpin(self, adapter_id: int) -> None:
        self.cache.release(adapter_id)

    def slots_for(self, seqs) -> dict[int, int]:
        return {s.seq_id: self.cache.slot_of(s.adapter_id) for s in seqs
                if s.adapter_id is not None}

    def wait_for_progress(self) -> None:
        """Nothing can run until an adapter load finishes: give the copy threads time."""
        time.sleep(0.0005)

    def stats(self) -> dict:
        """The native cache's counters, and `registrations` / `registration_seconds`: adapters
        registered and the time their plans and native registration took."""
        if self.cache is None:
            return {}
        with self._lock:
            ours = {"registrations": self._registrations,
                    "registration_seconds": self._registration_seconds}
        return {**self.cache.stats(), **ours}

    def metrics(self) -> dict:
        """Adapter load metrics, ready for a Prometheus exporter:

        - "loads", "evictions": completed loads into / evictions from each tier ("host" is
          disk -> host, "device" host -> device); "load_failures": failed disk -> host loads;
        - "arrivals": requests by where their adapter was when they arrived ("device" is a hit;
          "host", "loading" and "disk" wait for a load; "failed" cannot run);
        - "bytes": "disk_to_host" (file bytes read) and "host_to_device" (bytes copied);
        - "host_memory": bytes of host memory "in_use" behind host copies (and reads, copies)
          and "kept" for the next loads (the host reserve among them);
        - "load_seconds": per tier a histogram {"buckets": [(le, cumulative count), ...,
          ("+Inf", count)], "sum": seconds, "count": loads}, the shape of prometheus_client's
          HistogramMetricFamily.add_metric.
        Empty when the engine runs without adapters."""
        cache = self.cache  # close() may run on another thread
        if cache is None:
            return {}
        stats = cache.stats()
        with self._lock:
            arrivals = dict(self._arrivals)
        return {
            "loads": {"host": stats["host_loads"], "device": stats["device_loads"]},
            "load_failures": {"host": stats["host_loads_failed"]},
            "evictions": {"host": stats["host_evictions"], "device": stats["device_evictions"]},
            "arrivals": arrivals,
            "bytes": {"disk_to_host": stats["host_bytes_read"],
                      "host_to_device": stats["bytes_loaded"]},
            "host_memory": {"in_use": stats["host_block_bytes_in_use"],
                            "kept": stats["host_block_bytes_kept"]},
            "load_seconds": {
                "host": _histogram(stats["host_load_histogram"], stats["host_load_seconds"]),
                "device": _histogram(stats["device_load_histogram"], stats["load_seconds"]),
            },
        }

    def close(self) -> None:
        """Stops the adapter cache's threads and frees its host copies and row tables (the page
        pool's memory belongs to the engine). The manager serves nothing afterwards."""
        self.views = None
        self.cache = None  # joins the loader threads, drains in-flight copies
        self.copies = None
        self._ids.clear()
        self._requests.clear()


def _native_spec(plan, sites) -> object:
    """The native AdapterSpec of a parsed PEFT plan (sites by index, in the model's order)."""
    site_index = {s.name: i for i, s in enumerate(sites)}
    matrices = _C.lora_matrix_sources([
        (site_index[m.site], m.layer, m.expert, m.is_b, m.file_index, m.tensor, m.offset, m.rows,
         m.cols, m.row_stride, m.col_stride, m.scale, m.experts, m.expert_stride)
        for m in plan.sources
    ])
    ranks = [list(plan.ranks.get(s.name, [0] * s.num_layers)) for s in sites]
    return _C.AdapterSpec(name=plan.name, files=[str(f) for f in plan.files], ranks=ranks,
                          matrices=matrices)


def _problem(error: Exception, request: LoRARequest) -> str:
    """A native adapter error's message without its "adapter 'NAME': " prefix (the Python error
    puts its own)."""
    return _problem_of(error, request.lora_name)


def _problem_of(error: Exception, name: str) -> str:
    return str(error).removeprefix(f"adapter '{name}': ")


def _histogram(counts: list[int], total_seconds: float) -> dict:
    """Per-bucket counts (the last above every bound) as a Prometheus histogram: cumulative
    counts by upper bound, "+Inf" last."""
    buckets, running = [], 0
    for bound, count in zip(_C.ADAPTER_LOAD_SECONDS_BUCKETS, counts):
        running += count
        buckets.append((repr(float(bound)), running))
    running += counts[-1]
    buckets.append(("+Inf", running))
    return {"buckets": buckets, "sum": total_seconds, "count": running}
