"""kopf handlers: thin glue around `reconcile()` (reconcile.py). Read, reconcile, apply.

- Indexes keep the cluster as the watches see it: GPU nodes, the GPUs pods hold, trainer Jobs and pods, and
  the FineTuneJobs themselves, each slimmed to what a decision reads (slim.py). kopf passes them to every
  handler as arguments; placement costs no request.
- Events drive every reconcile: a FineTuneJob event (except echoes of our own status write), a trainer pod
  event, a trainer Job or JobSet event that says something (a condition, a suspend) for its FineTuneJob.
- One operator-level task (`resync`, started by a startup handler, not a timer per object) wakes every
  `poll_interval` seconds: it plans Pending (and undecided) jobs again against the current inventory and polls
  Running trainers' /status for progress; Queued and Suspended jobs are re-read every RESYNC_TICKS wake-ups as a
  safety net for a missed event. A finished job (`slim.settled`) costs nothing but its index entry: no task, no
  periodic work, no finalizer.
- Events (kubectl describe) are posted by the reconcile itself before the status patch that records the
  transition, so an operator killed in between posts it again on restart rather than never.

State that is not in the cluster lives in `Runtime` (kopf's `memo`): the status each job was last written
with (the watch lags), per-job locks, and caches. All of it is rebuilt from the cluster on restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
import kopf

from kubetune import quota, wire
from kubetune.contracts import TrainerStatus
from kubetune.errors import HubUnreachable, SpecError
from kubetune.planning.cache import PlanCache
from kubetune.planning.gpus import GpuCatalog
from kubetune.planning.models import Architecture
from kubetune.planning.placement import Inventory, Supply, supply_of
from kubetune.planning.plan import Plan
from kubetune.sources import model_architecture
from kubetune.spec import API_GROUP, API_VERSION, PLURAL, FineTuneJobSpec
from kubetune_operator import resources, scaleout, slim
from kubetune_operator import status as st
from kubetune_operator.cache import Cache
from kubetune_operator.kube import ApiError, Kube, NotOurs
from kubetune_operator.metrics import Metrics
from kubetune_operator.reconcile import Actions, Snapshot, reconcile
from kubetune_operator.settings import Settings

FTJ = (API_GROUP, API_VERSION, PLURAL)
FINALIZER = "kubetune.io/finalizer"  # set by operators before 0.x's per-job timer; kopf removes it (main.py)
RESYNC_TICKS = 6  # Queued and Suspended jobs are re-read every RESYNC_TICKS poll intervals (events follow them)
RESYNC_CONCURRENCY = 32  # reconciles one resync wake-up runs at once
DISCOVERY_SECONDS = 60.0
log = logging.getLogger("kubetune.operator")


@dataclass
class Runtime:
    """One operator's settings and caches, shared by its handlers through kopf's memo (`memo.kubetune`)."""

    settings: Settings
    metrics: Metrics
    catalog: GpuCatalog
    login: Callable[..., Any] | None = None  # a test's login handler (None: in-cluster or kubeconfig)
    kube: Kube | None = None
    cache: Cache = field(default_factory=Cache)  # the cluster as the watches see it
    written: dict[str, dict[str, Any]] = field(default_factory=dict)  # uid -> status as last written
    seen: dict[str, tuple[Any, ...]] = field(default_factory=dict)  # uid -> what its last reconcile read (_essence)
    locks: dict[str, asyncio.Lock] = field(default_factory=dict)  # uid -> serializes reconciles of one job
    phases: dict[str, str] = field(default_factory=dict)  # uid -> phase, for the jobs-by-phase gauge
    plans: PlanCache = field(default_factory=PlanCache)  # make_plan's results (also the webhook's), bounded
    supplies: dict[tuple[Any, ...], Supply] = field(default_factory=dict)  # the inventory's classes, by its nodes
    archs: dict[tuple[str | None, str | None], Architecture | SpecError | HubUnreachable] = field(default_factory=dict)
    jobset_api: str | None = None  # the cluster serves JobSets (discovery, at login and every DISCOVERY_SECONDS)
    jobset_checked: float | None = None  # time.monotonic() of that discovery
    resync_task: asyncio.Task[None] | None = None  # the operator's one periodic task (start_resync)
    quotas: quota.QuotaFile | None = None  # the mounted quotas file (settings.quotas_file), read on first use
    holdings: quota.Holdings = field(default_factory=quota.Holdings)  # what each namespace's jobs hold, kept current

    def quota_of(self, namespace: str | None, uid: str) -> tuple[quota.Limits | None, quota.Usage]:
        """The namespace's quota and what its other FineTuneJobs hold (as this operator last wrote them, else as
        watched: `holdings`, kept by on_finetunejob and apply)."""
        if self.quotas is None:
            self.quotas = quota.QuotaFile(self.settings.quotas_file)
        limits = self.quotas.get().for_namespace(namespace or "")
        if limits is None:
            return None, quota.Usage()
        return limits, self.holdings.usage(namespace or "", uid)

    def forget(self, uid: str, *, phase: bool = True) -> None:
        """Drop a job's working state: when it is deleted, or once it is settled (its phase stays counted)."""
        for cache in (self.written, self.locks, self.seen, *((self.phases,) if phase else ())):
            cache.pop(uid, None)

    async def discover(self, force: bool = False) -> None:
        """Whether the cluster serves JobSets (`GET /apis/jobset.x-k8s.io`; scaleout decides from the answer):
        asked at login, then again at most every DISCOVERY_SECONDS, so installing JobSet needs no restart."""
        now = time.monotonic()
        if self.kube is None or (not force and self.jobset_checked is not None
                                 and now - self.jobset_checked < DISCOVERY_SECONDS):
            return
        self.jobset_checked = now
        try:
            self.jobset_api = scaleout.jobset_api(await self.kube.api_group(wire.JOBSET_GROUP))
        except (ApiError, aiohttp.ClientError, TimeoutError) as exc:
            log.warning(f"discovery of {wire.JOBSET_GROUP} failed, keeping the last answer: {exc!r}")

    def launch_lock(self, namespace: str | None, uid: str, body: Mapping[str, Any]
                    ) -> contextlib.AbstractAsyncContextManager[Any]:
        """A job that may launch, in a namespace with a quota, decides alone there: otherwise jobs applied at once
        would each see the others' room (they count once Queued). Running jobs' reconciles take no lock."""
        if self.quotas is None:
            self.quotas = quota.QuotaFile(self.settings.quotas_file)
        if self.quotas.get().for_namespace(namespace or "") is None or \
                ((self.written.get(uid) or body.get("status") or {}).get("jobName")):
            return contextlib.nullcontext()
        return self.locks.setdefault(f"namespace/{namespace}", asyncio.Lock())

    def count_phases(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for value in self.phases.values():
            counts[value] = counts.get(value, 0) + 1
        return counts

    def architecture(self, name: str | None, source: str | None) -> Architecture:
        """model_architecture, remembered (resolved off the event loop: see prefetch). A spec error is
        remembered too; a hub that did not answer only until the next prefetch."""
        if (name, source) not in self.archs:
            if len(self.archs) >= 1024:
                self.archs.clear()
            try:
                self.archs[(name, source)] = model_architecture(name, source)
            except (SpecError, HubUnreachable) as exc:
                self.archs[(name, source)] = exc
        found = self.archs[(name, source)]
        if isinstance(found, Exception):
            raise found
        return found

    async def prefetch(self, spec: Mapping[str, Any]) -> None:
        """Resolve the model's architecture in a thread (an s3:// config.json, or a hub id the catalog does not
        know, read from the hub with its timeout), so that planning never blocks the operator's other jobs."""
        model = spec.get("model")
        model = model if isinstance(model, Mapping) else {}
        key = (model.get("name"), model.get("source"))
        if not (isinstance(key[0], str) or isinstance(key[1], str)):
            return
        if isinstance(self.archs.get(key), HubUnreachable):
            del self.archs[key]  # ask the hub again
        if key not in self.archs:
            with contextlib.suppress(SpecError, HubUnreachable):
                await asyncio.to_thread(self.architecture, *key)

    def supply(self, inventory: Inventory) -> Supply:
        key = tuple((n.name, n.allocatable_gpus, n.schedulable, tuple(sorted(n.labels.items())))
                    for n in inventory.nodes)
        if key not in self.supplies:
            if len(self.supplies) >= 64:
                self.supplies.clear()
            self.supplies[key] = supply_of(inventory, self.catalog)
        return self.supplies[key]

    def planner(self, supply: Supply) -> Callable[[FineTuneJobSpec, str | None], Plan]:
        def plan(spec: FineTuneJobSpec, above: str | None) -> Plan:
            arch = self.architecture(spec.model.name, spec.model.source)
            return self.plans.plan(spec, arch, self.catalog, above=above, supply=supply)
        return plan


def _essence(body: Mapping[str, Any]) -> tuple[Any, ...]:
    """What a FineTuneJob event can bring that a reconcile reads, besides status: its spec (by generation) and
    labels (the Kueue queue). An event that changes neither nor the status is an echo (of a status write, or of
    kopf's finalizer)."""
    meta = body.get("metadata") or {}
    return meta.get("generation"), tuple(sorted((meta.get("labels") or {}).items()))


# --- the cache: the cluster as the watches see it (cache.py) -----------------------------------------------

async def on_node(event: Mapping[str, Any], name: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    cache: Cache = memo.kubetune.cache
    cache.saw(event)
    cache.node(event.get("type") == "DELETED", name, body)


# --- read, reconcile, apply ---------------------------------------------------------------------------------

async def poll_trainer(ip: str | None, port: int | None, timeout: float) -> TrainerStatus | None:
    if not ip or not port:
        return None
    url = f"http://{ip}:{port}/status"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session, \
                session.get(url) as response:
            data = await response.json(content_type=None) if response.status == 200 else None
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        log.debug(f"trainer /status at {url} not reachable: {exc!r}")
        return None
    return TrainerStatus.parse(data)


async def run_reconcile(body: Mapping[str, Any], rt: Runtime, *, source: str, poll: bool = False) -> bool:
    """One reconcile of one FineTuneJob; False when it failed (logged: the next event or timer retries)."""
    meta = body.get("metadata") or {}
    uid = meta.get("uid", "")
    if not uid or meta.get("deletionTimestamp"):
        return True
    started, result = time.perf_counter(), "error"
    try:
        async with rt.locks.setdefault(uid, asyncio.Lock()), rt.launch_lock(meta.get("namespace"), uid, body):
            snap = await read(body, rt, poll=poll)
            await apply(snap, reconcile(snap), rt, uid)
            rt.seen[uid] = _essence(body)
        result = "ok"
    except Exception:
        log.exception(f"reconcile of {meta.get('namespace')}/{meta.get('name')} failed; the next event or timer "
                      "retries")
    finally:
        rt.metrics.reconciles.labels(source, result).inc()
        rt.metrics.reconcile_seconds.labels(source).observe(time.perf_counter() - started)
    return result == "ok"


async def read(body: Mapping[str, Any], rt: Runtime, *, poll: bool) -> Snapshot:
    """The snapshot: spec and metadata from the watch; status as this operator last wrote it (the watch lags)."""
    namespace = (body.get("metadata") or {}).get("namespace")
    status = rt.written.get((body.get("metadata") or {}).get("uid", "")) or body.get("status") or {}
    name = status.get("jobName")
    uid = (body.get("metadata") or {}).get("uid")
    trainer, pods = rt.cache.workload(namespace, name, uid) if name else (None, ())
    cluster = rt.cache.inventory()
    await rt.prefetch(body.get("spec") or {})
    await rt.discover()
    outcome = st.observe(trainer, pods, rt.settings.trainer_port)  # once: reconcile reads it from the snapshot
    trainer_status = None
    if poll and name and outcome.state is st.ObservedState.RUNNING:
        timeout = min(5.0, max(1.0, rt.settings.poll_interval))
        trainer_status = await poll_trainer(outcome.pod_ip, outcome.port, timeout)
    limits, usage = rt.quota_of(namespace, uid or "")
    return Snapshot(body=body, status=status, trainer_job=trainer, pods=pods, outcome=outcome, inventory=cluster,
                    catalog=rt.catalog, settings=rt.settings, planner=rt.planner(rt.supply(cluster)), now=st.now_iso(),
                    trainer_status=trainer_status, jobset_api=rt.jobset_api, quota=limits, usage=usage)


def event_name(snap: Snapshot, reason: str, number: int) -> str:
    """An Event's name, the same each time one transition is decided: from the job's uid and the status it
    was decided from (a restart between the Event and the status patch decides it again from that status)."""
    meta = snap.body["metadata"]
    source = json.dumps([meta.get("uid"), snap.status, reason, number], sort_keys=True, default=str)
    return f"{resources.short_name(meta['name'], 63 - 17)}.{hashlib.sha256(source.encode()).hexdigest()[:16]}"


async def apply(snap: Snapshot, actions: Actions, rt: Runtime, uid: str) -> None:
    assert rt.kube is not None, "the login handler sets up the API client before any handler runs"
    if actions.create:  # the ConfigMap first: a Job must never start on a ConfigMap of that name that is not ours
        try:
            for child in actions.create:
                created = await rt.kube.create_or_adopt(child, uid)
                if created and child["kind"] == "Job":
                    rt.metrics.jobs_created.inc()
        except NotOurs as exc:
            actions = reconcile(replace(snap, child_conflict=str(exc)))
    if actions.suspend_job is not None:
        await rt.kube.set_job_suspend(snap.body["metadata"]["namespace"], *actions.suspend_job,
                                      kind=(snap.trainer_job or {}).get("kind") or "Job")
    for number, event in enumerate(actions.events):  # before the status that records the transition
        await rt.kube.post_event(snap.body, event.type, event.reason.value, event.message, snap.now,
                                 event_name(snap, event.reason.value, number))
    if actions.status:
        meta = snap.body["metadata"]
        updated = await rt.kube.patch_status(meta["namespace"], meta["name"], actions.status)
        if updated is None:
            return  # the FineTuneJob is gone
        rt.written[uid] = dict(updated.get("status") or {})
        rt.holdings.set(meta["namespace"], uid, rt.written[uid])
    rt.phases[uid] = (rt.written.get(uid) or snap.status).get("phase") or "Pending"
    rt.metrics.count(actions.counters)


# --- what triggers a reconcile -----------------------------------------------------------------------------

async def on_finetunejob(event: Mapping[str, Any], body: kopf.Body, namespace: str | None, name: str, uid: str,
                         memo: kopf.Memo, **_: Any) -> None:
    rt: Runtime = memo.kubetune
    rt.cache.saw(event)
    deleted = event.get("type") == "DELETED"
    watched = slim.finetunejob(body)
    rt.cache.finetunejob(deleted, (namespace, resources.job_label(name)), watched)
    if deleted:
        rt.forget(uid)
        rt.holdings.set(namespace or "", uid, None)
        return
    status = rt.written.get(uid) or watched["status"]
    rt.holdings.set(namespace or "", uid, status)
    rt.phases.setdefault(uid, status.get("phase") or "Pending")
    if slim.settled(status, watched["metadata"].get("generation")):
        if slim.settled(watched["status"], watched["metadata"].get("generation")):
            rt.forget(uid, phase=False)  # the watch has caught up with the last write: nothing left to hold
        return  # finished and unchanged: nothing to decide, nothing to follow
    if not rt.cache.listed:
        return  # the resync task's first pass decides, once the whole cluster is listed
    if rt.seen.get(uid) == _essence(watched) and watched["status"] == rt.written.get(uid):
        return  # the echo of this operator's own status write: nothing new to decide
    await run_reconcile(watched, rt, source="finetunejob")  # a failure: the next resync tries again


def _parent(rt: Runtime, namespace: str | None, labels: Mapping[str, str]) -> Mapping[str, Any] | None:
    """The FineTuneJob a trainer Job or pod belongs to (by its label), unless it has none, is settled, or the
    initial listing is still coming in."""
    parent = rt.cache.finetunejobs.get((namespace, labels.get(resources.LABEL_JOB, "")))
    if parent is None or not rt.cache.listed:
        return None
    meta = parent.get("metadata") or {}
    status = rt.written.get(meta.get("uid", "")) or parent.get("status") or {}
    if not status.get("jobName") or slim.settled(status, meta.get("generation")):
        return None
    return parent


async def on_pod(event: Mapping[str, Any], body: kopf.Body, namespace: str | None, uid: str,
                 labels: Mapping[str, str], memo: kopf.Memo, **_: Any) -> None:
    """Every pod: the GPUs it holds (placement); a trainer pod's state (its FineTuneJob's reconcile)."""
    rt: Runtime = memo.kubetune
    rt.cache.saw(event)
    rt.cache.pod(event.get("type") == "DELETED", uid, namespace, labels, body)
    parent = _parent(rt, namespace, labels) if labels.get(wire.MANAGED_BY_LABEL) == wire.MANAGED_BY else None
    if parent is not None:
        await run_reconcile(parent, rt, source="trainer")


def _says_something(body: Mapping[str, Any]) -> bool:
    """A trainer Job or JobSet event a reconcile can act on: suspended (Kueue, spec.suspend) or a condition
    (Complete, Failed, Suspended...). A Job just created, or one whose pods come and go, says nothing: its
    pods' own events follow those."""
    conditions = (body.get("status") or {}).get("conditions") or []
    return bool((body.get("spec") or {}).get("suspend")) or any(c.get("status") == "True" for c in conditions)


async def on_trainer_job(event: Mapping[str, Any], body: kopf.Body, namespace: str | None, name: str,
                         labels: Mapping[str, str], memo: kopf.Memo, **_: Any) -> None:
    rt: Runtime = memo.kubetune
    rt.cache.saw(event)
    store = rt.cache.jobsets if body.get("kind") == "JobSet" else rt.cache.jobs
    rt.cache.put(store, event.get("type") == "DELETED", (namespace, name), slim.workload(body))
    parent = _parent(rt, namespace, labels) if _says_something(body) else None
    if parent is not None:
        await run_reconcile(parent, rt, source="trainer")


def due(status: Mapping[str, Any], generation: Any, tick: int) -> bool:
    """Whether resync wake-up number `tick` reconciles a job: undecided, Pending (plan and place again) and
    Running (poll the trainer's /status) jobs every time; Queued and Suspended ones every RESYNC_TICKS (their
    Job and pod events follow them); settled ones never."""
    if slim.settled(status, generation):
        return False
    return status.get("phase") in (None, "Pending", "Running") or tick % RESYNC_TICKS == 0


def busy(rt: Runtime, body: Mapping[str, Any]) -> bool:
    """A reconcile of this job is running now (an event's): the resync leaves the job to it."""
    lock = rt.locks.get(body["metadata"].get("uid", ""))
    return lock is not None and lock.locked()


async def resync_once(rt: Runtime, tick: int) -> int:
    """One wake-up of the resync task: the due jobs' reconciles, RESYNC_CONCURRENCY at a time. A job being
    reconciled already is skipped (in a burst, hundreds are in flight at a wake-up; reconciling each again
    after it doubled the operator's CPU per job); the next wake-up looks at it again."""
    bodies = list(rt.cache.unsettled.values())  # settled ones are never due
    chosen = [b for b in bodies if due(rt.written.get(b["metadata"].get("uid", "")) or b.get("status") or {},
                                       b["metadata"].get("generation"), tick) and not busy(rt, b)]
    gate = asyncio.Semaphore(RESYNC_CONCURRENCY)

    async def one(body: Mapping[str, Any]) -> None:
        async with gate:
            if not busy(rt, body):
                await run_reconcile(body, rt, source="resync", poll=True)

    await asyncio.gather(*(one(body) for body in chosen))
    return len(chosen)


async def resync(rt: Runtime) -> None:
    """The operator's one periodic task: once the initial listing is in, a first pass over every unsettled job
    (the decisions a restart owes), then a resync_once every poll_interval seconds, for as long as it runs."""
    await rt.cache.settle()
    await resync_once(rt, 0)
    tick = 0
    while True:
        await asyncio.sleep(rt.settings.poll_interval)
        tick += 1
        try:
            await resync_once(rt, tick)
        except Exception:
            log.exception("resync failed; it runs again in the next interval")


async def start_resync(memo: kopf.Memo, **_: Any) -> None:
    rt: Runtime = memo.kubetune
    if rt.resync_task is None or rt.resync_task.done():
        rt.resync_task = asyncio.create_task(resync(rt), name="kubetune-resync")


async def login(memo: kopf.Memo, **kwargs: Any) -> kopf.ConnectionInfo | None:
    """In-cluster service account or kubeconfig (or a test's emulator); the API client uses the same login."""
    rt: Runtime = memo.kubetune
    info: kopf.ConnectionInfo | None
    if rt.login is not None:
        info = rt.login(memo=memo, **kwargs)
    else:
        info = kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)
    if info is not None:
        if rt.kube is not None:
            await rt.kube.close()
        rt.kube = Kube(info, kwargs["settings"].networking.error_backoffs)
        await rt.discover(force=True)
    return info


async def close(memo: kopf.Memo, **_: Any) -> None:
    rt: Runtime = memo.kubetune
    if rt.resync_task is not None:
        rt.resync_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await rt.resync_task
        rt.resync_task = None
    if rt.kube is not None:
        await rt.kube.close()


def register(registry: kopf.OperatorRegistry, settings: Settings) -> None:
    """Register the handlers on `registry` (tests run several operators, each with its own registry)."""
    kopf.on.login(registry=registry, id="login")(login)
    kopf.on.startup(registry=registry, id="resync")(start_resync)
    kopf.on.cleanup(registry=registry, id="close")(close)
    kopf.on.event("", "v1", "nodes", id="node", registry=registry)(on_node)
    kopf.on.event("", "v1", "pods", id="pod", registry=registry)(on_pod)
    kopf.on.event("batch", "v1", "jobs", labels=wire.MANAGED, id="trainer_job", registry=registry)(on_trainer_job)
    # JobSets, where the cluster serves them (kopf watches the API once its CRD exists; a warning before that)
    kopf.on.event(wire.JOBSET_GROUP, wire.JOBSET_VERSION, "jobsets", labels=wire.MANAGED, id="trainer_jobset",
                  registry=registry)(on_trainer_job)
    kopf.on.event(*FTJ, id="finetunejob", registry=registry)(on_finetunejob)
