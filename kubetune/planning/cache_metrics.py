"""The plan cache's hit rate for Prometheus (kubetune.planning.cache): the operator's and the API's /metrics.
Imported only by those two (their extras bring prometheus-client; the core's dependencies do not).

    kubetune_plan_cache_hits_total / kubetune_plan_cache_misses_total   plans served from the cache / made
    kubetune_plan_cache_entries                                         plans held now (at most its size)

Hit rate: `rate(kubetune_plan_cache_hits_total[5m]) / (rate(..._hits_total[5m]) + rate(..._misses_total[5m]))`.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kubetune.planning.cache import PlanCache


class PlanCacheCollector(Collector):
    def __init__(self, cache: PlanCache) -> None:
        self._cache = cache

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily("kubetune_plan_cache_hits", "Plans served from the plan cache",
                                  value=self._cache.hits)
        yield CounterMetricFamily("kubetune_plan_cache_misses", "Plans made (not in the plan cache)",
                                  value=self._cache.misses)
        yield GaugeMetricFamily("kubetune_plan_cache_entries", f"Plans the cache holds (at most {self._cache.size})",
                                value=len(self._cache))
