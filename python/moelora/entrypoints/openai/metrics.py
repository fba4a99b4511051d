"""Prometheus metrics with vLLM's names, prefixed `moelora:`, plus moelora's own (adapter
tiers, adapter loads, pool pages by owner).

Latency histograms are observed as events happen (the AsyncEngine calls the `on_*` hooks from
its thread; prometheus_client is thread-safe). Gauges and the engine's own counters are read
from the AsyncEngine's latest snapshot at scrape time by a custom collector, so a scrape never
waits for a step. Each server owns its registry: several servers can live in one process.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

P = "moelora:"

# vLLM's buckets.
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
TPOT_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0]
REQUEST_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
LOAD_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0]


class ServerMetrics:
    def __init__(self, model_name: str, max_loras: int):
        disable_created_metrics()  # no *_created series, as vLLM
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        self.max_loras = max_loras
        labels = ["model_name"]
        r = self.registry
        self.ttft = Histogram(P + "time_to_first_token_seconds", "Time to first token.",
                              labels, buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram(P + "time_per_output_token_seconds",
                              "Mean time per output token of a request, after the first.",
                              labels, buckets=TPOT_BUCKETS, registry=r)
        self.itl = Histogram(P + "inter_token_latency_seconds",
                             "Time between successive token outputs of a request.",
                             labels, buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram(P + "e2e_request_latency_seconds", "End-to-end request latency.",
                             labels, buckets=REQUEST_BUCKETS, registry=r)
        self.queue = Histogram(P + "request_queue_time_seconds",
                               "Time a request waited before its first step.", labels,
                               buckets=REQUEST_BUCKETS, registry=r)
        self.prompt_tokens = Counter(P + "prompt_tokens", "Prefilled prompt tokens.", labels,
                                     registry=r)
        self.generation_tokens = Counter(P + "generation_tokens", "Generated tokens.", labels,
                                         registry=r)
        self.request_success = Counter(P + "request_success", "Finished requests by reason.",
                                       labels + ["finished_reason"], registry=r)
        self.lora_load = Histogram(P + "lora_load_seconds",
                                   "Host-to-device adapter load time (mean over the loads "
                                   "completed between two engine iterations).",
                                   buckets=LOAD_BUCKETS, registry=r)
        self.http_requests = Counter(P + "http_requests", "HTTP requests by route and status.",
                                     ["route", "status"], registry=r)
        self.snapshot_source = None  # set to the AsyncEngine by the server
        r.register(_EngineCollector(self))

    # -- hooks called from the engine thread --------------------------------------------------
    def on_scheduled(self, queue_s: float) -> None:
        self.queue.labels(self.model_name).observe(queue_s)

    def on_first_token(self, ttft_s: float, prompt_tokens: int) -> None:
        self.ttft.labels(self.model_name).observe(ttft_s)
        self.prompt_tokens.labels(self.model_name).inc(prompt_tokens)

    def on_tokens(self, count: int, itl_s: float | None) -> None:
        self.generation_tokens.labels(self.model_name).inc(count)
        if itl_s is not None:
            self.itl.labels(self.model_name).observe(itl_s)

    def on_finished(self, output, e2e_s: float, tpot_s: float | None) -> None:
        self.e2e.labels(self.model_name).observe(e2e_s)
        if tpot_s is not None:
            self.tpot.labels(self.model_name).observe(tpot_s)
        reasons = {o.finish_reason or "abort" for o in output.outputs}
        reason = "error" if "error" in reasons else min(reasons)
        self.request_success.labels(self.model_name, reason).inc()

    def on_adapter_loads(self, count: int, seconds: float) -> None:
        mean = max(0.0, seconds) / count
        for _ in range(count):
            self.lora_load.observe(mean)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector(Collector):
    """Gauges and engine counters from the AsyncEngine's last snapshot."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics

    def collect(self):
        source = self.metrics.snapshot_source
        if source is None:
            return
        snap = source.snapshot
        name = self.metrics.model_name
        pool, adapters = snap.pool, snap.adapters

        def gauge(metric, doc, value, labels=None, label_names=("model_name",)):
            family = GaugeMetricFamily(P + metric, doc, labels=list(label_names))
            family.add_metric(labels or [name], value)
            return family

        yield gauge("num_requests_running", "Sequences in the running batch.", snap.num_running)
        yield gauge("num_requests_waiting", "Sequences waiting to be scheduled.",
                    source.num_waiting)
        total = pool.get("total_pages", 0)
        yield gauge("kv_cache_usage_perc", "Fraction of the unified pool's pages holding KV "
                    "(1 = full).", pool.get("kv_pages", 0) / total if total else 0.0)
        preemptions = CounterMetricFamily(P + "num_preemptions", "Preemptions (recompute).",
                                          labels=["model_name"])
        preemptions.add_metric([name], snap.engine_stats.get("preemptions", 0))
        yield preemptions
        for metric, key, doc in (
                ("prefix_cache_queries", "prefix_cache_query_tokens",
                 "Prompt tokens looked up in the prefix cache."),
                ("prefix_cache_hits", "prefix_cache_hit_tokens",
                 "Prompt tokens found in the prefix cache (their KV reused).")):
            family = CounterMetricFamily(P + metric, doc, labels=["model_name"])
            family.add_metric([name], snap.engine_stats.get(key, 0))
            yield family
        info = GaugeMetricFamily(P + "lora_requests_info", "Adapters of running and waiting "
                                 "requests.", labels=["max_lora", "running_lora_adapters",
                                                      "waiting_lora_adapters"])
        info.add_metric([str(self.metrics.max_loras), ",".join(snap.running_adapters),
                         ",".join(snap.waiting_adapters)], snap.time)
        yield info
        tiers = GaugeMetricFamily(P + "lora_adapters", "Registered adapters by tier (device "
                                  "includes loading).", labels=["tier"])
        tiers.add_metric(["device"], adapters.get("on_device", 0) + adapters.get("loading", 0))
        tiers.add_metric(["host"], adapters.get("on_host", 0))
        tiers.add_metric(["disk"], adapters.get("on_disk", 0) +
                         adapters.get("waiting_for_memory", 0))
        yield tiers
        load_bytes = CounterMetricFamily(P + "lora_load_bytes", "Adapter bytes copied host to "
                                         "device.")
        load_bytes.add_metric([], adapters.get("bytes_loaded", 0))
        yield load_bytes
        loads = CounterMetricFamily(P + "lora_loads", "Adapter loads by tier transition.",
                                    labels=["to"])
        loads.add_metric(["host"], adapters.get("host_loads", 0))
        loads.add_metric(["device"], adapters.get("device_loads", 0))
        yield loads
        pages = GaugeMetricFamily(P + "pool_pages", "Unified pool pages by owner (pinned_adapter: "
                                  "adapter pages pinned by running requests).", labels=["kind"])
        for kind in ("kv", "adapter", "free", "pinned_adapter"):
            pages.add_metric([kind], pool.get(f"{kind}_pages", 0))
        yield pages
        owners = GaugeMetricFamily(P + "pool_owners", "Owners of pool pages (a KV owner is one "
                                   "sequence's blocks, an adapter owner one adapter).",
                                   labels=["kind"])
        for kind in ("kv", "adapter"):
            owners.add_metric([kind], pool.get(f"{kind}_owners", 0))
        yield owners
        yield gauge("pool_total_pages", "Pages in the unified pool.", total)
        yield gauge("requests_in_flight", "Requests handed to the engine and not finished.",
                    snap.in_flight)
