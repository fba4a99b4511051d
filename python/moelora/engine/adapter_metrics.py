"""Adapter load metrics as Prometheus series, read from AdapterManager.metrics() at scrape time.

  moelora:adapter_load_seconds{tier}      histogram: disk -> host loads (tier="host", read start
                                          to host copy) and host -> device loads (tier="device",
                                          copy start to resident)
  moelora:adapter_loads_total{tier}       completed loads into each tier
  moelora:adapter_load_failures_total{tier}
  moelora:adapter_evictions_total{tier}   copies dropped from each tier
  moelora:adapter_hits_total{tier}        requests whose adapter was already in that tier when
                                          they arrived (device: served without a load; host:
                                          only the copy to the device)
  moelora:adapter_requests_total{found}   requests by where their adapter was when they arrived
                                          (device, host, loading, disk, failed)
  moelora:adapter_load_bytes_total{path}  bytes moved: disk_to_host (file bytes read),
                                          host_to_device (bytes copied)
  moelora:adapter_host_memory_bytes{state}  gauge: host memory of the adapters' host copies:
                                          in_use (behind host copies, reads and copies) and
                                          kept (blocks kept for the next loads, the reserve
                                          made ahead among them)

The counters and histogram buckets are the native cache's own (cumulative since the engine
started), so a scrape costs one stats() call and never waits for a step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

P = "moelora:"
logger = logging.getLogger(__name__)


class AdapterMetricsCollector(Collector):
    """Turns the dict of `source` (AdapterManager.metrics) into metric families."""

    def __init__(self, source: Callable[[], dict]):
        self.source = source

    def describe(self):
        # Names known without asking the engine (the registry checks them for clashes).
        return list(self._families(_EMPTY))

    def collect(self):
        try:
            metrics = self.source()
        except Exception:  # an engine shutting down: the scrape goes on without these series
            logger.warning("adapter metrics unavailable", exc_info=True)
            return []
        return list(self._families(metrics)) if metrics else []

    @staticmethod
    def _families(m: dict):
        seconds = HistogramMetricFamily(P + "adapter_load_seconds",
                                        "Adapter load latency by tier (host: disk to host, "
                                        "device: host to device).", labels=["tier"])
        for tier, histogram in m["load_seconds"].items():
            seconds.add_metric([tier], histogram["buckets"], histogram["sum"])
        yield seconds
        yield _counter("adapter_loads", "Adapter loads completed into each tier.", "tier",
                       m["loads"])
        yield _counter("adapter_load_failures", "Adapter loads that failed, by tier.", "tier",
                       m["load_failures"])
        yield _counter("adapter_evictions", "Adapter copies evicted from each tier.", "tier",
                       m["evictions"])
        arrivals = m["arrivals"]
        yield _counter("adapter_hits", "Requests whose adapter was already in the tier when "
                       "they arrived.", "tier",
                       {tier: arrivals.get(tier, 0) for tier in ("device", "host")})
        yield _counter("adapter_requests", "Requests by where their adapter was when they "
                       "arrived.", "found", arrivals)
        yield _counter("adapter_load_bytes", "Adapter bytes moved, by path.", "path", m["bytes"])
        memory = GaugeMetricFamily(P + "adapter_host_memory_bytes", "Host memory of adapter "
                                   "host copies: in use, and kept for the next loads.",
                                   labels=["state"])
        for state, value in m["host_memory"].items():
            memory.add_metric([state], value)
        yield memory


def _counter(name: str, doc: str, label: str, values: dict) -> CounterMetricFamily:
    family = CounterMetricFamily(P + name, doc, labels=[label])
    for key, value in values.items():
        family.add_metric([key], value)
    return family


_EMPTY_HISTOGRAM = {"buckets": [("+Inf", 0)], "sum": 0.0}
_EMPTY = {"load_seconds": {"host": _EMPTY_HISTOGRAM, "device": _EMPTY_HISTOGRAM},
          "loads": {}, "load_failures": {}, "evictions": {}, "arrivals": {}, "bytes": {},
          "host_memory": {}}


def register_adapter_metrics(registry: CollectorRegistry,
                             source: Callable[[], dict]) -> AdapterMetricsCollector:
    """Adds the adapter load metrics to `registry`; `source` is AdapterManager.metrics (any
    callable returning its dict; {} exports nothing)."""
    collector = AdapterMetricsCollector(source)
    registry.register(collector)
    return collector
