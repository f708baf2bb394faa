"""`kubetune operator`: run kopf with kubetune's handlers, plus /metrics and /healthz."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import socket
from dataclasses import dataclass, replace
from typing import Any, cast

import kopf

from kubetune import wire
from kubetune.planning.cache_metrics import PlanCacheCollector
from kubetune.planning.gpus import load_catalog
from kubetune_operator.handlers import FINALIZER, Runtime, register
from kubetune_operator.metrics import Metrics, serve
from kubetune_operator.settings import Settings
from kubetune_operator.webhook import WebhookSettings
from kubetune_operator.webhook import install as install_webhook

PREFIX = "kubetune.io"


class NoDiffBase(kopf.DiffBaseStorage):
    """kubetune registers no change-detecting handlers (on.create/update/delete), only on.event and indexes,
    so kopf needs no "last handled" copy of each object. Skipping it saves a deep copy of every body on
    every watch event, and kopf writes no `last-handled-configuration` annotation onto FineTuneJobs."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return cast(kopf.BodyEssence, {})

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


LIST_CHUNK = 500  # objects per LIST page when kopf (re)lists a kind: one page is parsed and held at a time
WORKER_IDLE_SECONDS = 0.5  # how long kopf keeps an object's worker (and its last raw event) after the event


def kopf_settings(settings: kopf.OperatorSettings, *, backoffs: tuple[float, ...] | None = None) -> None:
    """How kopf keeps its own bookkeeping, lists and watches, and retries API errors.

    Any bookkeeping would live in annotations (`kubetune.io/...`), never in `.status.kopf`: the CRD's status
    schema is strict and a real API server prunes unknown status fields.

    Memory at platform scale (docs/benchmarks.md, issue 20): a restart lists every watched object; kopf parses
    each LIST response whole unless `chunk_size` pages it, and each object's worker keeps its last raw event
    until it has idled `idle_timeout` (kopf's default, 5 s, kept thousands of full bodies alive at once during
    a relist; the allocator then kept the peak). Events of one object are processed in order either way; a
    worker that idled out is started again by the object's next event. Trainer Jobs and JobSets are listed and
    watched by label on the server: the cluster's other Jobs never reach the operator.
    """
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = NoDiffBase()
    settings.persistence.finalizer = FINALIZER  # no handler needs one: kopf removes one an older operator left
    settings.posting.level = logging.WARNING  # Events come from the reconciles (Kube.post_event), not from logs
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.chunk_size = LIST_CHUNK
    managed = ",".join(f"{key}={value}" for key, value in wire.MANAGED.items())
    settings.watching.label_selectors["batch", "v1", "jobs"] = managed
    settings.watching.label_selectors[wire.JOBSET_GROUP, wire.JOBSET_VERSION, "jobsets"] = managed
    settings.queueing.worker_limit = 1000
    settings.queueing.idle_timeout = WORKER_IDLE_SECONDS
    if backoffs is not None:
        settings.networking.error_backoffs = backoffs


def build_operator(settings: Settings, metrics: Metrics, login: Any = None) -> tuple[kopf.OperatorRegistry, kopf.Memo]:
    """kubetune's handlers in a registry, and the memo they share; `login`: a login function returning a
    `kopf.ConnectionInfo` (tests point the operator at an emulator); default: in-cluster, then kubeconfig."""
    registry = kopf.OperatorRegistry()
    runtime = Runtime(settings, metrics, load_catalog(settings.gpu_catalog, settings.provisionable_gpu_classes),
                      login=login)
    metrics.count_phases_with(runtime.count_phases)
    metrics.registry.register(PlanCacheCollector(runtime.plans))

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        kopf_settings(settings)

    register(registry, settings)
    # optional (chart value webhook.enabled); it plans through the operator's plan cache
    install_webhook(registry, runtime.catalog, WebhookSettings.from_env(), runtime.plans)
    return registry, kopf.Memo(kubetune=runtime)


def peering_priority(name: str | None = None) -> int:
    """kopf pauses every replica whose peer has the same priority; replicas of one Deployment differ by pod
    name, so a priority derived from it makes exactly one of them (the highest) active."""
    digest = hashlib.sha256((name or socket.gethostname()).encode()).digest()
    return 1 + int.from_bytes(digest[:4], "big") % 100_000


async def run_async(settings: Settings, *, stop: asyncio.Event | None = None) -> None:
    metrics = Metrics()
    ready = asyncio.Event()
    runner = await serve(metrics, settings.metrics_port, ready)
    registry, memo = build_operator(settings, metrics)
    try:
        await kopf.operator(
            registry=registry,
            memo=memo,
            clusterwide=not settings.namespaces,
            namespaces=list(settings.namespaces),
            standalone=settings.peering is None,
            peering_name=settings.peering,
            priority=peering_priority() if settings.peering else None,
            ready_flag=ready,
            stop_flag=stop,
        )
    finally:
        await runner.cleanup()


@dataclass(frozen=True)
class OperatorOptions:
    """`kubetune operator`'s options (the CLI's flags, typed); unset ones keep the settings from the environment."""

    namespaces: tuple[str, ...] = ()  # watch only these (default: the environment's, else the whole cluster)
    peering: str | None = None  # kopf peering name for HA (default: the environment's, else standalone)
    metrics_port: int | None = None  # /metrics, /healthz and /readyz


def operator_settings(options: OperatorOptions, base: Settings) -> Settings:
    """`base` (Settings.from_env()) with the options the command line gave."""
    return replace(base, namespaces=options.namespaces or base.namespaces, peering=options.peering or base.peering,
                   metrics_port=base.metrics_port if options.metrics_port is None else options.metrics_port)


def run_operator(options: OperatorOptions) -> int:
    settings = operator_settings(options, Settings.from_env())
    level = getattr(logging, os.environ.get("KUBETUNE_LOG_LEVEL", "INFO").upper(), logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if level > logging.DEBUG:  # kopf logs every handler call at INFO: noise, and CPU at hundreds of jobs
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await run_async(settings, stop=stop)

    asyncio.run(main())
    return 0
