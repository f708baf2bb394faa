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
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
import kopf

from kubetune.contracts import TrainerStatus
from kubetune.errors import SpecError
from kubetune.planning.gpus import GpuCatalog
from kubetune.planning.hub_config import HubUnreachable
from kubetune.planning.models import Architecture, model_architecture
from kubetune.planning.placement import Inventory, NodeInfo, Supply, node_info, pod_gpus, supply_of
from kubetune.planning.plan import Plan, make_plan
from kubetune.spec import API_GROUP, API_VERSION, PLURAL, FineTuneJobSpec
from kubetune_operator import resources, scaleout, slim, trust
from kubetune_operator import status as st
from kubetune_operator.kube import ApiError, Kube, NotOurs
from kubetune_operator.metrics import Metrics
from kubetune_operator.reconcile import Actions, Snapshot, reconcile
from kubetune_operator.settings import Settings

FTJ = (API_GROUP, API_VERSION, PLURAL)
MANAGED = {"app.kubernetes.io/managed-by": "kubetune"}
FINALIZER = "kubetune.io/finalizer"  # set by operators before 0.x's per-job timer; kopf removes it (main.py)
RESYNC_TICKS = 6  # Queued and Suspended jobs are re-read every RESYNC_TICKS poll intervals (events follow them)
RESYNC_CONCURRENCY = 32  # reconciles one resync wake-up runs at once
DISCOVERY_SECONDS = 60.0
JOBSET_NAME = "jobset.sigs.k8s.io/jobset-name"  # the JobSet controller's label on its Jobs and pods
JOB_NAME = "batch.kubernetes.io/job-name"  # the Job controller's label on its pods
log = logging.getLogger("kubetune.operator")


@dataclass
class Runtime:
    """One operator's settings and caches, shared by its handlers through kopf's memo (`memo.kubetune`)."""

    settings: Settings
    metrics: Metrics
    catalog: GpuCatalog
    login: Callable[..., Any] | None = None  # a test's login handler (None: in-cluster or kubeconfig)
    kube: Kube | None = None
    written: dict[str, dict[str, Any]] = field(default_factory=dict)  # uid -> status as last written
    seen: dict[str, tuple[Any, ...]] = field(default_factory=dict)  # uid -> what its last reconcile read (_essence)
    locks: dict[str, asyncio.Lock] = field(default_factory=dict)  # uid -> serializes reconciles of one job
    phases: dict[str, str] = field(default_factory=dict)  # uid -> phase, for the jobs-by-phase gauge
    plans: dict[tuple[str, str | None, Supply], Plan] = field(default_factory=dict)  # make_plan's results
    supplies: dict[tuple[Any, ...], Supply] = field(default_factory=dict)  # the inventory's classes, by its nodes
    archs: dict[tuple[str | None, str | None], Architecture | SpecError | HubUnreachable] = field(default_factory=dict)
    jobset_api: str | None = None  # the cluster serves JobSets (discovery, at login and every DISCOVERY_SECONDS)
    jobset_checked: float | None = None  # time.monotonic() of that discovery
    indexes: Mapping[str, Any] | None = None  # kopf's indexes (live views), as the first handler call got them
    resync_task: asyncio.Task[None] | None = None  # the operator's one periodic task (start_resync)

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
            self.jobset_api = scaleout.jobset_api(await self.kube.api_group(scaleout.JOBSET_GROUP))
        except (ApiError, aiohttp.ClientError, TimeoutError) as exc:
            log.warning(f"discovery of {scaleout.JOBSET_GROUP} failed, keeping the last answer: {exc!r}")

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
            key = (spec.model_dump_json(include={"model", "method", "lora", "training", "resources"}), above, supply)
            if key not in self.plans:
                if len(self.plans) >= 1024:
                    self.plans.clear()
                self.plans[key] = make_plan(spec, self.architecture(spec.model.name, spec.model.source),
                                            self.catalog, above=above, supply=supply)
            return self.plans[key]
        return plan


def _essence(body: Mapping[str, Any]) -> tuple[Any, ...]:
    """What a FineTuneJob event can bring that a reconcile reads, besides status: its spec (by generation) and
    labels (the Kueue queue). An event that changes neither nor the status is an echo (of a status write, or of
    kopf's finalizer)."""
    meta = body.get("metadata") or {}
    return meta.get("generation"), tuple(sorted((meta.get("labels") or {}).items()))


def _first(index: kopf.Index[Any, Any], key: Any) -> Any:
    return next(iter(index.get(key, [])), None)


# --- indexes: the cluster as the watches see it (async: kopf runs sync handlers in a thread pool) -----------

async def gpu_nodes(name: str, body: kopf.Body, **_: Any) -> dict[str, NodeInfo] | None:
    info = node_info(body)
    return {name: info} if info.allocatable_gpus > 0 else None


async def gpu_pods(body: kopf.Body, **_: Any) -> dict[str, int] | None:
    node, gpus = pod_gpus(body)
    return {node: gpus} if node and gpus else None


async def trainer_pods(namespace: str | None, labels: Mapping[str, str], body: kopf.Body, **_: Any) -> dict[Any, Any]:
    """Keyed by the workload the pod says it belongs to (its JobSet, else its Job); trust checks owners later."""
    workload = labels.get(JOBSET_NAME) or labels.get(JOB_NAME)
    if not workload:
        attempt = int(labels.get(resources.LABEL_ATTEMPT, "0") or 0)
        workload = resources.child_name(labels.get(resources.LABEL_JOB, ""), attempt)
    return {(namespace, workload): slim.pod(body)}


async def trainer_jobs(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    return {(namespace, name): slim.workload(body)}


async def finetunejobs(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    return {(namespace, resources.job_label(name)): slim.finetunejob(body)}  # children find it by their label


def inventory(gpu_nodes: kopf.Index[str, NodeInfo], gpu_pods: kopf.Index[str, int]) -> Inventory:
    nodes = [info for _, store in gpu_nodes.items() for info in store]
    return Inventory(tuple(nodes), {node: sum(store) for node, store in gpu_pods.items()})


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


async def run_reconcile(body: Mapping[str, Any], rt: Runtime, indexes: Mapping[str, Any], *, source: str,
                        poll: bool = False) -> bool:
    """One reconcile of one FineTuneJob; False when it failed (logged: the next event or timer retries)."""
    meta = body.get("metadata") or {}
    uid = meta.get("uid", "")
    if not uid or meta.get("deletionTimestamp"):
        return True
    started, result = time.perf_counter(), "error"
    try:
        async with rt.locks.setdefault(uid, asyncio.Lock()):
            snap = await read(body, rt, indexes, poll=poll)
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


async def read(body: Mapping[str, Any], rt: Runtime, indexes: Mapping[str, Any], *, poll: bool) -> Snapshot:
    """The snapshot: spec and metadata from the watch; status as this operator last wrote it (the watch lags)."""
    namespace = (body.get("metadata") or {}).get("namespace")
    status = rt.written.get((body.get("metadata") or {}).get("uid", "")) or body.get("status") or {}
    name = status.get("jobName")
    uid = (body.get("metadata") or {}).get("uid")
    trainer, pods = workload(indexes, namespace, name, uid) if name else (None, ())
    cluster = inventory(indexes["gpu_nodes"], indexes["gpu_pods"])
    await rt.prefetch(body.get("spec") or {})
    await rt.discover()
    trainer_status = None
    if poll and name:
        outcome = st.observe(trainer, pods, rt.settings.trainer_port)
        if outcome.state == "Running":
            timeout = min(5.0, max(1.0, rt.settings.poll_interval))
            trainer_status = await poll_trainer(outcome.pod_ip, outcome.port, timeout)
    return Snapshot(body=body, status=status, trainer_job=trainer, pods=pods, inventory=cluster, catalog=rt.catalog,
                    settings=rt.settings, planner=rt.planner(rt.supply(cluster)), now=st.now_iso(),
                    trainer_status=trainer_status, jobset_api=rt.jobset_api)


def workload(indexes: Mapping[str, Any], namespace: str | None, name: str, owner_uid: str | None
             ) -> tuple[Mapping[str, Any] | None, tuple[Mapping[str, Any], ...]]:
    """The attempt's Job or JobSet, if this FineTuneJob controls it, and the pods it controls (a JobSet's through
    its child Jobs, which the trainer_jobs index holds too: they carry the trainer labels)."""
    found = _first(indexes["trainer_jobs"], (namespace, name)) or _first(indexes["trainer_jobsets"], (namespace, name))
    trainer = trust.trusted_job(found, owner_uid)
    pods = indexes["trainer_pods"].get((namespace, name), [])
    if trainer is not None and trainer.get("kind") == "JobSet":
        jobs = [_first(indexes["trainer_jobs"], (namespace, job)) for job in scaleout.jobset_job_names(trainer)]
        return trainer, trust.trusted_jobset_pods(trainer, [j for j in jobs if j is not None], pods)
    return trainer, trust.trusted_pods(trainer, pods)


async def apply(snap: Snapshot, actions: Actions, rt: Runtime, uid: str) -> None:
    assert rt.kube is not None, "the login handler sets up the API client before any handler runs"
    if actions.create:  # the ConfigMap first: a Job must never start on a ConfigMap of that name that is not ours
        try:
            for child in actions.create:
                _, created = await rt.kube.create_or_adopt(child, uid)
                if created and child["kind"] == "Job":
                    rt.metrics.jobs_created.inc()
        except NotOurs as exc:
            actions = reconcile(replace(snap, child_conflict=str(exc)))
    if actions.suspend_job is not None:
        await rt.kube.set_job_suspend(snap.body["metadata"]["namespace"], *actions.suspend_job,
                                      kind=(snap.trainer_job or {}).get("kind") or "Job")
    for event in actions.events:  # before the status that records the transition: a kill in between repeats it
        await rt.kube.post_event(snap.body, event.type, event.reason.value, event.message, snap.now)
    if actions.status:
        meta = snap.body["metadata"]
        updated = await rt.kube.patch_status(meta["namespace"], meta["name"], actions.status)
        if updated is None:
            return  # the FineTuneJob is gone
        rt.written[uid] = dict(updated.get("status") or {})
    rt.phases[uid] = (rt.written.get(uid) or snap.status).get("phase") or "Pending"
    for counter, labels in actions.counters:
        metric = rt.metrics.placement_failures if counter == "placement_failures" else rt.metrics.oom_escalations
        metric.labels(*labels).inc()


# --- what triggers a reconcile -----------------------------------------------------------------------------

async def on_finetunejob(event: Mapping[str, Any], body: kopf.Body, uid: str, memo: kopf.Memo,
                         **indexes: Any) -> None:
    rt: Runtime = memo.kubetune
    rt.indexes = indexes
    if event.get("type") == "DELETED":
        rt.forget(uid)
        return
    watched = slim.finetunejob(body)
    status = rt.written.get(uid) or watched["status"]
    rt.phases.setdefault(uid, status.get("phase") or "Pending")
    if slim.settled(status, watched["metadata"].get("generation")):
        if slim.settled(watched["status"], watched["metadata"].get("generation")):
            rt.forget(uid, phase=False)  # the watch has caught up with the last write: nothing left to hold
        return  # finished and unchanged: nothing to decide, nothing to follow
    if rt.seen.get(uid) == _essence(watched) and watched["status"] == rt.written.get(uid):
        return  # the echo of this operator's own status write: nothing new to decide
    await run_reconcile(watched, rt, indexes, source="finetunejob")  # a failure: the next resync tries again


def _parent(rt: Runtime, indexes: Mapping[str, Any], namespace: str | None, label: str) -> Mapping[str, Any] | None:
    """The FineTuneJob a trainer Job or pod belongs to (by its label), unless it has none or is settled."""
    parent = _first(indexes["finetunejobs"], (namespace, label))
    if parent is None:
        return None
    meta = parent.get("metadata") or {}
    status = rt.written.get(meta.get("uid", "")) or parent.get("status") or {}
    if not status.get("jobName") or slim.settled(status, meta.get("generation")):
        return None
    return parent


async def on_trainer_pod(namespace: str | None, labels: Mapping[str, str], memo: kopf.Memo, **indexes: Any) -> None:
    rt: Runtime = memo.kubetune
    rt.indexes = indexes
    parent = _parent(rt, indexes, namespace, labels.get(resources.LABEL_JOB, ""))
    if parent is not None:
        await run_reconcile(parent, rt, indexes, source="trainer")


def _says_something(body: Mapping[str, Any]) -> bool:
    """A trainer Job or JobSet event a reconcile can act on: suspended (Kueue, spec.suspend) or a condition
    (Complete, Failed, Suspended...). A Job just created, or one whose pods come and go, says nothing: its
    pods' own events follow those."""
    conditions = (body.get("status") or {}).get("conditions") or []
    return bool((body.get("spec") or {}).get("suspend")) or any(c.get("status") == "True" for c in conditions)


async def on_trainer_job(namespace: str | None, labels: Mapping[str, str], body: kopf.Body, memo: kopf.Memo,
                         **indexes: Any) -> None:
    rt: Runtime = memo.kubetune
    rt.indexes = indexes
    if _says_something(body):
        parent = _parent(rt, indexes, namespace, labels.get(resources.LABEL_JOB, ""))
        if parent is not None:
            await run_reconcile(parent, rt, indexes, source="trainer")


def due(status: Mapping[str, Any], generation: Any, tick: int) -> bool:
    """Whether resync wake-up number `tick` reconciles a job: undecided, Pending (plan and place again) and
    Running (poll the trainer's /status) jobs every time; Queued and Suspended ones every RESYNC_TICKS (their
    Job and pod events follow them); settled ones never."""
    if slim.settled(status, generation):
        return False
    return status.get("phase") in (None, "Pending", "Running") or tick % RESYNC_TICKS == 0


async def resync_once(rt: Runtime, tick: int) -> int:
    """One wake-up of the resync task: the due jobs' reconciles, RESYNC_CONCURRENCY at a time."""
    if rt.indexes is None:
        return 0  # no FineTuneJob seen yet
    indexes = rt.indexes
    bodies = [body for _, store in indexes["finetunejobs"].items() for body in store]
    chosen = [b for b in bodies if due(rt.written.get(b["metadata"].get("uid", "")) or b.get("status") or {},
                                       b["metadata"].get("generation"), tick)]
    gate = asyncio.Semaphore(RESYNC_CONCURRENCY)

    async def one(body: Mapping[str, Any]) -> None:
        async with gate:
            await run_reconcile(body, rt, indexes, source="resync", poll=True)

    await asyncio.gather(*(one(body) for body in chosen))
    return len(chosen)


async def resync(rt: Runtime) -> None:
    """The operator's one periodic task: a resync_once every poll_interval seconds, for as long as it runs."""
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
    kopf.index("", "v1", "nodes", id="gpu_nodes", registry=registry)(gpu_nodes)
    kopf.index("", "v1", "pods", id="gpu_pods", registry=registry)(gpu_pods)
    kopf.index("", "v1", "pods", labels=MANAGED, id="trainer_pods", registry=registry)(trainer_pods)
    kopf.index("batch", "v1", "jobs", labels=MANAGED, id="trainer_jobs", registry=registry)(trainer_jobs)
    # JobSets, where the cluster serves them (kopf watches the API once its CRD exists; a warning before that)
    kopf.index(scaleout.JOBSET_GROUP, scaleout.JOBSET_VERSION, "jobsets", labels=MANAGED, id="trainer_jobsets",
               registry=registry)(trainer_jobs)
    kopf.index(*FTJ, id="finetunejobs", registry=registry)(finetunejobs)
    kopf.on.event(*FTJ, id="finetunejob", registry=registry)(on_finetunejob)
    kopf.on.event("", "v1", "pods", labels=MANAGED, id="trainer_pod", registry=registry)(on_trainer_pod)
    kopf.on.event("batch", "v1", "jobs", labels=MANAGED, id="trainer_job", registry=registry)(on_trainer_job)
    kopf.on.event(scaleout.JOBSET_GROUP, scaleout.JOBSET_VERSION, "jobsets", labels=MANAGED, id="trainer_jobset",
                  registry=registry)(on_trainer_job)
