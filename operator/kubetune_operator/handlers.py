"""kopf handlers: thin glue. Read the FineTuneJob, call the pure functions, write status and children.

One idempotent function, `reconcile(finetunejob)`, decides everything from the object and the cluster:
- no status yet, a spec change, Pending -> `launch`: parse spec -> plan -> place -> ConfigMap + Job
- a launched attempt -> `follow`: its Job and pods (from kopf indexes fed by watches) say waiting, running,
  succeeded, failed, or out of memory (-> launch the next attempt one GPU class up)

It runs on every FineTuneJob event (except the echo of its own status write), on every event of a trainer
pod (for its FineTuneJob), and from a sweep every `poll_interval` seconds, which also polls running
trainers' /status and notices Job-level changes (Kueue admission, a Job that failed without a pod). Handlers are
`on.event` and indexes only: kopf keeps no bookkeeping on the objects (no annotations, no finalizer),
so the happy path costs 4 API requests per job (ConfigMap, Job, status, Event) and deleting a
FineTuneJob never waits for the operator. Everything the operator knows about a job is in its
`.status` and the cluster; children have deterministic names and are adopted on 409.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

import aiohttp
import kopf

from kubetune.contracts import Phase, Reason, TrainerStatus
from kubetune.errors import PlanError, SpecError
from kubetune.planning.gpus import GpuCatalog
from kubetune.planning.models import model_architecture
from kubetune.planning.placement import Inventory, NodeInfo, node_info, place, pod_gpus
from kubetune.planning.plan import Plan, make_plan
from kubetune.spec import API_GROUP, API_VERSION, KIND, PLURAL, FineTuneJobSpec, parse_spec
from kubetune_operator import kube, resources
from kubetune_operator import status as st
from kubetune_operator.metrics import Metrics
from kubetune_operator.settings import Settings

FTJ = (API_GROUP, API_VERSION, PLURAL)
MANAGED = {"app.kubernetes.io/managed-by": "kubetune"}
FINISHED = ("OutOfMemory", "Failed", "Succeeded")
log = logging.getLogger("kubetune.operator")


def _oom_floor(attempts: Iterable[Mapping[str, Any]], catalog: GpuCatalog) -> str | None:
    """The largest class an earlier attempt ran out of memory on: re-plans go strictly above it."""
    classes = [a["gpuClass"] for a in attempts if a.get("outcome") == "OutOfMemory" and a.get("gpuClass")]
    known = [catalog.get(c, "status.attempts.gpuClass") for c in classes if c in catalog.names]
    return max(known, key=lambda g: g.memory_bytes).name if known else None


def _next_attempt(attempts: Iterable[Mapping[str, Any]]) -> int:
    """The attempt to launch: the last one again unless it finished (a launch is idempotent per number)."""
    last = max(attempts, key=lambda a: a.get("attempt", 0), default=None)
    if last is None:
        return 1
    return int(last["attempt"]) + (1 if last.get("outcome") in FINISHED else 0)


def _with_attempt(attempts: Iterable[Mapping[str, Any]], number: int, **fields: Any) -> list[dict[str, Any]]:
    """The attempts list with entry `number` created or updated (lists are replaced whole by merge patches)."""
    result = [dict(a) for a in attempts]
    for entry in result:
        if entry.get("attempt") == number:
            entry.update({k: v for k, v in fields.items() if v is not None})
            return result
    result.append({"attempt": number, **{k: v for k, v in fields.items() if v is not None}})
    return sorted(result, key=lambda a: a["attempt"])


def _plain(body: Mapping[str, Any], keys: Iterable[str] = ("apiVersion", "kind", "metadata", "spec", "status")
           ) -> dict[str, Any]:
    """The parts of a watched body to keep: a shallow copy of the top level. Each watch event brings new
    dicts (kopf does not change them in place) and nothing here modifies them, so no deep copy is needed."""
    return {k: body.get(k) for k in keys}


class Job:
    """One FineTuneJob being reconciled: its snapshot, its status as last written, and the pending write."""

    def __init__(self, body: Mapping[str, Any], status: Mapping[str, Any]) -> None:
        self.body = body
        self.meta: Mapping[str, Any] = body.get("metadata") or {}
        self.spec: Mapping[str, Any] = body.get("spec") or {}
        self.status: dict[str, Any] = dict(status)
        self.patch: dict[str, Any] = {}
        self.events: list[st.Event] = []

    @property
    def key(self) -> tuple[str, str]:
        return self.meta.get("namespace", ""), self.meta.get("name", "")

    @property
    def generation(self) -> int | None:
        return self.meta.get("generation")

    def write(self, *, phase: Phase, reason: Reason, message: str, warning: bool = False, **fields: Any) -> None:
        changes, event = st.transition(self.status, phase=phase, reason=reason, message=message,
                                       generation=self.generation, warning=warning, **fields)
        self.set(**changes)
        if event is not None:
            self.events.append(event)

    def set(self, **fields: Any) -> None:
        self.patch.update(fields)
        for key, value in fields.items():
            if value is None:
                self.status.pop(key, None)
            else:
                self.status[key] = value


def register(registry: kopf.OperatorRegistry, settings: Settings, metrics: Metrics, catalog: GpuCatalog) -> None:
    """Register every handler on `registry` (tests build one registry per operator instance)."""

    # Caches, not state: all of it is rebuilt from the cluster when the operator starts.
    world: dict[str, Any] = {}  # kopf's settings and live indexes, captured from handler kwargs
    written: dict[str, dict[str, Any]] = {}  # uid -> the status this operator last wrote (it is the only writer)
    locks: dict[str, asyncio.Lock] = {}  # uid -> serializes reconciles of one FineTuneJob
    phases: dict[str, str] = {}  # uid -> phase, for the jobs-by-phase gauge
    echoes: dict[str, str | None] = {}  # uid -> resourceVersion of our last status write (its watch echo)
    finetunejobs: dict[tuple[str | None, str], dict[str, Any]] = {}  # (namespace, name) -> latest snapshot

    def count_phases() -> dict[str, int]:
        counts: dict[str, int] = {}
        for value in phases.values():
            counts[value] = counts.get(value, 0) + 1
        return counts

    metrics.count_phases_with(count_phases)

    def capture(kwargs: Mapping[str, Any]) -> None:
        if "gpu_nodes" not in world:
            world.update({k: kwargs[k] for k in ("gpu_nodes", "gpu_pods", "trainer_jobs", "trainer_pods")
                          if k in kwargs})

    # --- indexes: the cluster as the watches see it (no requests per job) ------------------------------
    # (async: kopf runs sync handlers in a thread pool, which costs more than these take)

    @kopf.index("", "v1", "nodes", id="gpu_nodes", registry=registry)
    async def gpu_nodes(name: str, body: kopf.Body, **_: Any) -> dict[str, NodeInfo] | None:
        info = node_info(body)
        return {name: info} if info.allocatable_gpus > 0 else None

    @kopf.index("", "v1", "pods", id="gpu_pods", registry=registry)
    async def gpu_pods(body: kopf.Body, **_: Any) -> dict[str, int] | None:
        node, gpus = pod_gpus(body)
        return {node: gpus} if node and gpus else None

    @kopf.index("", "v1", "pods", labels=MANAGED, id="trainer_pods", registry=registry)
    async def trainer_pods(namespace: str | None, labels: Mapping[str, str], body: kopf.Body,
                           **_: Any) -> dict[Any, Any]:
        attempt = int(labels.get(resources.LABEL_ATTEMPT, "0") or 0)
        return {(namespace, resources.child_name(labels.get(resources.LABEL_JOB, ""), attempt)): _plain(body)}

    @kopf.index("batch", "v1", "jobs", labels=MANAGED, id="trainer_jobs", registry=registry)
    async def trainer_jobs(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> dict[Any, Any]:
        return {(namespace, name): _plain(body)}

    # --- the one reconcile ----------------------------------------------------------------------------

    def inventory() -> Inventory:
        nodes = [info for _, store in world["gpu_nodes"].items() for info in store]
        in_use = {node: sum(store) for node, store in world["gpu_pods"].items()}
        return Inventory(tuple(nodes), in_use)

    plans: dict[tuple[str, str | None], Plan] = {}  # a pure function's results, keyed by what it reads

    def plan_for(spec: FineTuneJobSpec, above: str | None) -> Plan:
        key = (spec.model_dump_json(include={"model", "method", "lora", "training", "resources"}), above)
        if key not in plans:
            arch = model_architecture(spec.model.name, spec.model.source)
            if len(plans) >= 1024:
                plans.clear()
            plans[key] = make_plan(spec, arch, catalog, above=above)
        return plans[key]

    async def reconcile(body: Mapping[str, Any], *, poll: bool = False, source: str) -> None:
        uid = (body.get("metadata") or {}).get("uid", "")
        if not uid or (body.get("metadata") or {}).get("deletionTimestamp"):
            return
        lock = locks.setdefault(uid, asyncio.Lock())
        started = time.perf_counter()
        result = "error"
        try:
            async with lock:
                # Spec and metadata from the watch; status as this operator last wrote it when the watch lags.
                job = Job(body, written.get(uid) or body.get("status") or {})
                await decide(job, poll=poll)
                await commit(job, uid)
            result = "ok"
        except kopf.PermanentError as exc:
            log.error(f"{body['metadata'].get('namespace')}/{body['metadata'].get('name')}: {exc}")
        except Exception:
            log.exception(f"reconcile of {body['metadata'].get('namespace')}/{body['metadata'].get('name')} failed;"
                          " the next event or sweep retries")
        finally:
            metrics.reconciles.labels(source, result).inc()
            metrics.reconcile_seconds.labels(source).observe(time.perf_counter() - started)

    async def commit(job: Job, uid: str) -> None:
        if job.patch:
            namespace, name = job.key
            updated = await kube.patch_status(namespace, name, job.patch, world["settings"], log)
            if updated is None:
                return
            written[uid] = dict(updated.get("status") or {})
            echoes[uid] = (updated.get("metadata") or {}).get("resourceVersion")
        phases[uid] = job.status.get("phase") or "Pending"
        for event in job.events:
            kopf.event(job.body, type=event.type, reason=event.reason.value, message=event.message)  # type: ignore[arg-type]

    async def decide(job: Job, *, poll: bool) -> None:
        phase = job.status.get("phase")
        spec_changed = job.status.get("observedGeneration") not in (None, job.generation)
        if phase is None or (spec_changed and (phase == "Failed" or not job.status.get("jobName"))):
            await launch(job, _next_attempt(job.status.get("attempts") or []))
            return
        if spec_changed and phase == "Succeeded":
            job.events.append(st.Event("Warning", Reason.SPEC_CHANGE_IGNORED, "the fine-tune has succeeded; apply a "
                                       "new FineTuneJob (another name) to train again"))
            job.set(observedGeneration=job.generation)
        elif spec_changed:
            await apply_spec_change(job)
        if phase in st.TERMINAL_PHASES:
            return
        if not job.status.get("jobName"):  # Pending: no node of the class yet; place again
            await launch(job, _next_attempt(job.status.get("attempts") or []))
            return
        await follow(job, poll=poll)

    async def launch(job: Job, attempt: int, reason: Reason | None = None, note: str = "") -> None:
        attempts = list(job.status.get("attempts") or [])
        floor = _oom_floor(attempts, catalog)
        try:
            spec = parse_spec(dict(job.spec))
            plan = plan_for(spec, floor)
        except PlanError as exc:
            job.write(phase=Phase.FAILED, reason=Reason.NO_LARGER_GPU_CLASS if floor else Reason.UNPLANNABLE,
                      message="; ".join(exc.problems))
            return
        except SpecError as exc:
            job.write(phase=Phase.FAILED, reason=Reason.INVALID_SPEC, message="; ".join(exc.problems))
            return

        fields = st.plan_fields(plan)
        labels = dict(job.meta.get("labels") or {})
        queue = resources.queue_name(spec, labels)
        placement = place(plan.gpu_class, plan.gpu_count, inventory(), catalog)
        if placement.kind == "NoNodes" and settings.wait_for_nodes and not queue:
            if job.status.get("phase") != "Pending":
                metrics.placement_failures.labels(plan.gpu_class).inc()
            job.write(phase=Phase.PENDING, reason=Reason.NO_MATCHING_NODES, message=note + placement.message,
                      warning=True, **fields)
            return

        owner = resources.Owner(job.meta["name"], job.meta["namespace"], job.meta["uid"], labels)
        gpu = catalog.get(plan.gpu_class, "status.plan.gpuClass")
        config = resources.config_map(owner, spec, plan, attempt, settings)
        trainer = resources.trainer_job(owner, spec, plan, gpu, attempt, settings)
        # The ConfigMap first: a Job must never start on a ConfigMap of that name that is not ours.
        try:
            await kube.create_or_adopt(config, owner.uid, world["settings"], log)
            _, created = await kube.create_or_adopt(trainer, owner.uid, world["settings"], log)
        except kube.NotOurs as exc:
            job.write(phase=Phase.FAILED, reason=Reason.CHILD_NAME_TAKEN, message=str(exc))
            return
        if created:
            metrics.jobs_created.inc()
        name = trainer["metadata"]["name"]
        if spec.suspend:
            phase, why = Phase.SUSPENDED, Reason.SUSPENDED
            text = f"spec.suspend is true; {name} is suspended"
        elif queue:
            phase, why = Phase.QUEUED, Reason.WAITING_FOR_KUEUE
            text = f"{name} on {plan.gpu_class} x{plan.gpu_count} waits for admission by Kueue queue {queue}"
        else:
            phase, why = Phase.QUEUED, Reason.JOB_CREATED
            text = f"{name} on {plan.gpu_class} x{plan.gpu_count}, estimate {fields['vram']}: {placement.message}"
        job.write(phase=phase, reason=reason or why, message=note + text, warning=bool(note), jobName=name,
                  attempts=_with_attempt(attempts, attempt, gpuClass=plan.gpu_class, jobName=name,
                                         outcome="Pending", startedAt=st.now_iso()),
                  **fields)

    async def apply_spec_change(job: Job) -> None:
        """A spec change while an attempt exists: suspend/resume its Job; other fields wait for the next attempt."""
        namespace, _ = job.key
        name = job.status["jobName"]
        trainer = next(iter(world["trainer_jobs"].get((namespace, name), [])), None)
        suspend = bool(job.spec.get("suspend"))
        queued = job.spec.get("queue") or (job.meta.get("labels") or {}).get(resources.QUEUE_LABEL)
        job_suspended = bool(((trainer or {}).get("spec") or {}).get("suspend"))
        if suspend != (job.status.get("phase") == "Suspended"):  # the change is (also) to spec.suspend
            if trainer is not None and suspend != job_suspended and (suspend or not queued):
                await kube.set_job_suspend(namespace, name, suspend, world["settings"], log)
            if suspend:
                job.write(phase=Phase.SUSPENDED, reason=Reason.SUSPENDED,
                          message=f"spec.suspend is true; {name} is suspended (checkpoints are kept)")
            else:
                job.write(phase=Phase.QUEUED, reason=Reason.RESUMED,
                          message=f"spec.suspend is false; {name} resumes from its last checkpoint"
                                  + (f" when Kueue queue {queued} admits it" if queued else ""))
        else:
            job.events.append(st.Event("Warning", Reason.SPEC_CHANGE_DEFERRED,
                                       f"the spec changed while {name} exists; changes apply to the next attempt "
                                       "(delete and re-apply the FineTuneJob to restart now)"))
        job.set(observedGeneration=job.generation)

    async def follow(job: Job, *, poll: bool) -> None:
        namespace, _ = job.key
        name = job.status["jobName"]
        attempts = list(job.status.get("attempts") or [])
        number = next((a["attempt"] for a in attempts if a.get("jobName") == name), max(1, len(attempts)))
        trainer = next(iter(world["trainer_jobs"].get((namespace, name), [])), None)
        pods = list(world["trainer_pods"].get((namespace, name), []))
        outcome = st.observe(trainer, pods, settings.trainer_port)
        log.debug(f"{namespace}/{name}: attempt {number} is {outcome.state}: {outcome.message}")
        phase = job.status.get("phase")
        plan = job.status.get("plan") or {}

        if outcome.state == "Running":
            progress = await poll_trainer(outcome.pod_ip, outcome.port) if poll else None
            def essence(p: Mapping[str, Any]) -> dict[str, Any]:
                return {k: v for k, v in p.items() if k != "updatedAt" and v is not None}

            moved = progress and essence(progress) != essence(job.status.get("progress") or {})
            extra = st.progress_fields(progress) if progress and moved else {}  # no write for a trainer at rest
            job.write(phase=Phase.RUNNING, reason=Reason.TRAINING, message=outcome.message,
                      attempts=_with_attempt(attempts, number, outcome="Running"), **extra)
        elif outcome.state == "Succeeded":
            summary = outcome.summary
            uri = summary.adapter_uri or \
                str((job.spec.get("output") or {}).get("uri", "")).rstrip("/") + "/adapter/"
            progress = dict(job.status.get("progress") or {})
            if summary.final_loss is not None:
                progress["loss"] = summary.final_loss
            if summary.steps:
                progress["step"] = summary.steps
            if summary.total_steps:
                progress["totalSteps"] = summary.total_steps
            if summary.peak_memory_bytes is not None:
                progress["peakMemoryBytes"] = summary.peak_memory_bytes
            progress["updatedAt"] = st.now_iso()
            job.write(phase=Phase.SUCCEEDED, reason=Reason.SUCCEEDED, message=f"adapter written to {uri}",
                      adapterUri=uri,
                      attempts=_with_attempt(attempts, number, outcome="Succeeded", finishedAt=st.now_iso()),
                      **st.progress_fields(progress))
        elif outcome.state == "OutOfMemory":
            was = plan.get("gpuClass", "?")
            job.set(attempts=_with_attempt(attempts, number, outcome="OutOfMemory", message=outcome.message,
                                           finishedAt=st.now_iso()))
            await launch(job, number + 1, reason=Reason.OUT_OF_MEMORY_ESCALATED,
                         note=f"attempt {number} on {was} ran out of GPU memory ({outcome.message}); re-planned one "
                              "class up, resuming from the last checkpoint: ")
            new_class = (job.status.get("plan") or {}).get("gpuClass")
            if job.status.get("phase") != "Failed" and new_class:
                metrics.oom_escalations.labels(was, new_class).inc()
            if job.status.get("jobName") == name:  # no larger class, or no node of it yet: this attempt is over
                job.set(jobName=None)
        elif outcome.state == "Failed":
            job.write(phase=Phase.FAILED, reason=Reason.TRAINING_FAILED, message=outcome.message,
                      attempts=_with_attempt(attempts, number, outcome="Failed", message=outcome.message,
                                             finishedAt=st.now_iso()))
        elif outcome.state == "Suspended":
            if job.spec.get("suspend"):
                job.write(phase=Phase.SUSPENDED, reason=Reason.SUSPENDED,
                          message=f"spec.suspend is true; {name} is suspended (checkpoints are kept)")
            elif phase == "Running":
                job.write(phase=Phase.QUEUED, reason=Reason.PREEMPTED, warning=True,
                          message=f"{name} was suspended (preempted by its queue); it resumes from its last "
                                  "checkpoint when admitted again")
        elif phase == "Running":  # the pod went away (a disruption); the Job controller makes a new one
            job.write(phase=Phase.QUEUED, reason=Reason.RESCHEDULING, message=outcome.message)

    async def poll_trainer(ip: str | None, port: int | None) -> dict[str, Any] | None:
        if not ip or not port:
            return None
        url = f"http://{ip}:{port}/status"
        try:
            timeout = aiohttp.ClientTimeout(total=min(5.0, max(1.0, settings.poll_interval)))
            async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as response:
                if response.status != 200:
                    return None
                data = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.debug(f"trainer /status at {url} not reachable: {exc!r}")
            return None
        parsed = TrainerStatus.parse(data)
        return st.trainer_progress(parsed, st.now_iso()) if parsed is not None else None

    # --- what triggers a reconcile --------------------------------------------------------------------

    @kopf.on.event(*FTJ, id="finetunejob", registry=registry)
    async def on_finetunejob(event: Mapping[str, Any], body: kopf.Body, uid: str, namespace: str | None, name: str,
                             **kwargs: Any) -> None:
        capture(kwargs)
        if event.get("type") == "DELETED":
            for cache in (written, locks, phases, echoes):
                cache.pop(uid, None)
            finetunejobs.pop((namespace, name), None)
            return
        snapshot = finetunejobs[(namespace, name)] = _plain(body)
        phases.setdefault(uid, (snapshot.get("status") or {}).get("phase") or "Pending")
        if body.get("metadata", {}).get("resourceVersion") == echoes.pop(uid, None):
            return  # the echo of this operator's own status write: nothing new to decide
        await reconcile(snapshot, source="finetunejob")

    async def on_child(namespace: str | None, labels: Mapping[str, str], kwargs: Mapping[str, Any]) -> None:
        capture(kwargs)
        parent = finetunejobs.get((namespace, labels.get(resources.LABEL_JOB, "")))
        if parent is not None and (parent.get("status") or {}).get("jobName"):
            await reconcile(parent, source="trainer")

    @kopf.on.event("", "v1", "pods", labels=MANAGED, id="trainer_pod", registry=registry)
    async def on_trainer_pod(namespace: str | None, labels: Mapping[str, str], **kwargs: Any) -> None:
        await on_child(namespace, labels, kwargs)

    gate = asyncio.Semaphore(32)  # a slow trainer /status must not hold up the others

    async def swept(body: Mapping[str, Any], gate: asyncio.Semaphore) -> None:
        async with gate:
            await reconcile(body, poll=True, source="sweep")

    async def sweep() -> None:
        """Every poll_interval: place Pending jobs again, poll running trainers, repair lost status writes."""
        while True:
            await asyncio.sleep(settings.poll_interval)
            if "gpu_nodes" not in world:
                continue
            snapshots = [body for body in list(finetunejobs.values())
                         if (body.get("status") or {}).get("phase") not in st.TERMINAL_PHASES]
            await asyncio.gather(*(swept(body, gate) for body in snapshots))

    @kopf.on.startup(id="kubetune", registry=registry)
    async def start(settings: kopf.OperatorSettings, **_: Any) -> None:
        world["settings"] = settings
        world["sweeper"] = asyncio.create_task(sweep(), name="kubetune-sweep")

    @kopf.on.cleanup(id="kubetune-cleanup", registry=registry)
    async def stop(**_: Any) -> None:
        task = world.get("sweeper")
        if task is not None:
            task.cancel()


__all__ = ["KIND", "register"]
