"""Operator metrics (`kubetune_operator_` prefix) and the /metrics + /healthz HTTP endpoint."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator, Mapping

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from kubetune.contracts import Phase


class _PhaseCollector(Collector):
    def __init__(self, counts: Callable[[], Mapping[str, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("kubetune_operator_jobs", "FineTuneJobs by phase", labels=["phase"])
        counts = self._counts()
        for phase in Phase:
            family.add_metric([phase.value], float(counts.get(phase, 0)))
        yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.reconciles = Counter(
            "kubetune_operator_reconcile_total", "Reconcile handler runs", ["handler", "result"],
            registry=self.registry,
        )
        self.reconcile_seconds = Histogram(
            "kubetune_operator_reconcile_duration_seconds", "Reconcile handler duration", ["handler"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=self.registry,
        )
        self.placement_failures = Counter(
            "kubetune_operator_placement_failures_total", "Placements that found no node of the planned class",
            ["gpu_class"], registry=self.registry,
        )
        self.oom_escalations = Counter(
            "kubetune_operator_oom_escalations_total",
            "Attempts re-planned one GPU class up after running out of GPU memory",
            ["from_class", "to_class"], registry=self.registry,
        )
        self.jobs_created = Counter(
            "kubetune_operator_trainer_jobs_created_total", "Trainer Jobs created", registry=self.registry,
        )
        self._phase_counts: Callable[[], Mapping[str, int]] = dict
        self.registry.register(_PhaseCollector(lambda: self._phase_counts()))

    def count(self, counters: Iterable[tuple[str, tuple[str, ...]]]) -> None:
        """Bump the counters a reconcile asked for (`reconcile.Actions.counters`), each the one of its name."""
        for name, labels in counters:
            metric = getattr(self, name)
            if not isinstance(metric, Counter):
                raise ValueError(f"{name!r} is not one of the operator's counters")
            (metric.labels(*labels) if labels else metric).inc()

    def count_phases_with(self, counts: Callable[[], Mapping[str, int]]) -> None:
        self._phase_counts = counts

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


async def serve(metrics: Metrics, port: int, ready: asyncio.Event, host: str = "0.0.0.0") -> web.AppRunner:
    """/metrics (Prometheus), /healthz (liveness: the process serves), /readyz (kopf is watching)."""

    async def metrics_view(_: web.Request) -> web.Response:
        return web.Response(body=metrics.exposition(), content_type="text/plain", charset="utf-8")

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        if ready.is_set():
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "starting"}, status=503)

    app = web.Application()
    app.router.add_get("/metrics", metrics_view)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
