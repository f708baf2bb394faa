"""kopf handlers: thin glue. Read the FineTuneJob, call the pure functions, write status/children.

- create / resume / spec update -> `launch`: parse spec -> plan -> place -> ConfigMap + Job -> status
- a timer per FineTuneJob -> `follow`: read the attempt's Job and pods (from kopf indexes fed by watches),
  poll the trainer's /status, finish, fail, or escalate one GPU class up after running out of memory
- indexes over Nodes, Pods, trainer Jobs: the cluster inventory for placement without extra requests

Everything the operator knows about a job is in its `.status` (and the cluster); a restarted operator
picks up where the last one stopped. Children have deterministic names and are adopted on 409.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import aiohttp
import kopf

from kubetune.errors import PlanError, SpecError
from kubetune.planning.gpus import GPU_RESOURCE, GpuCatalog
from kubetune.planning.models import resolve_architecture
from kubetune.planning.placement import Inventory, NodeInfo, node_info, place, pod_gpus
from kubetune.planning.plan import Plan, make_plan
from kubetune.spec import API_GROUP, API_VERSION, PLURAL, FineTuneJobSpec, parse_spec
from kubetune_operator import kube, resources
from kubetune_operator import status as st
from kubetune_operator.metrics import Metrics
from kubetune_operator.settings import Settings

FTJ = (API_GROUP, API_VERSION, PLURAL)
MANAGED = {"app.kubernetes.io/managed-by": "kubetune"}


def _s3_config_reader() -> Any:
    try:
        from kubetune_trainer.storage import read_remote_config
    except ImportError:
        return None
    return read_remote_config


def _inventory(nodes: kopf.Index, gpu_pods: kopf.Index) -> Inventory:
    infos: list[NodeInfo] = [info for _, store in nodes.items() for info in store]
    in_use = {node: sum(store) for node, store in gpu_pods.items()}
    return Inventory(tuple(infos), in_use)


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
    return int(last["attempt"]) + (1 if last.get("outcome") in ("OutOfMemory", "Failed", "Succeeded") else 0)


def _with_attempt(attempts: Iterable[Mapping[str, Any]], number: int, **fields: Any) -> list[dict[str, Any]]:
    """The attempts list with entry `number` created or updated (lists are replaced whole by merge patches)."""
    result = [dict(a) for a in attempts]
    for entry in result:
        if entry.get("attempt") == number:
            entry.update({k: v for k, v in fields.items() if v is not None})
            return result
    result.append({"attempt": number, **{k: v for k, v in fields.items() if v is not None}})
    return sorted(result, key=lambda a: a["attempt"])


def register(registry: kopf.OperatorRegistry, settings: Settings, metrics: Metrics, catalog: GpuCatalog) -> None:
    """Register every handler on `registry` (tests build one registry per operator instance)."""

    phases: dict[str, str] = {}
    metrics.count_phases_with(lambda: _count(phases.values()))

    def _count(values: Iterable[str]) -> dict[str, int]:
        counts: dict[str, int] = {}
        for value in values:
            counts[value] = counts.get(value, 0) + 1
        return counts

    def timed(name: str, fn: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
        async def wrapper(**kwargs: Any) -> None:
            started = time.perf_counter()
            result = "error"
            try:
                await fn(**kwargs)
                result = "ok"
            finally:
                metrics.reconciles.labels(name, result).inc()
                metrics.reconcile_seconds.labels(name).observe(time.perf_counter() - started)
        wrapper.__name__ = name
        return wrapper

    def write(body: kopf.Body, current: Mapping[str, Any], patch: kopf.Patch, *, phase: st.Phase,
              reason: str, message: str, warning: bool = False, **fields: Any) -> None:
        changes, event = st.transition(
            current, phase=phase, reason=reason, message=message,
            generation=body.get("metadata", {}).get("generation"), warning=warning, **fields,
        )
        for key, value in changes.items():
            patch.status[key] = value
        if event is not None:
            kopf.event(body, type=event.type, reason=event.reason, message=event.message)

    # --- inventory and children, fed by watches (no requests per job) ----------------------------------

    @kopf.index("", "v1", "nodes", id="gpu_nodes", registry=registry)
    def gpu_nodes(name: str, body: kopf.Body, **_: Any) -> dict[str, NodeInfo] | None:
        info = node_info(body)
        return {name: info} if info.allocatable_gpus > 0 else None

    @kopf.index("", "v1", "pods", id="gpu_pods", registry=registry)
    def gpu_pods(body: kopf.Body, **_: Any) -> dict[str, int] | None:
        node, gpus = pod_gpus(body)
        return {node: gpus} if node and gpus else None

    @kopf.index("", "v1", "pods", labels=MANAGED, id="trainer_pods", registry=registry)
    def trainer_pods(namespace: str | None, labels: Mapping[str, str], body: kopf.Body, **_: Any) -> dict[Any, Any]:
        key = (namespace, resources.child_name(labels.get(resources.LABEL_JOB, ""),
                                               int(labels.get(resources.LABEL_ATTEMPT, "0") or 0)))
        return {key: _plain(body)}

    @kopf.index("batch", "v1", "jobs", labels=MANAGED, id="trainer_jobs", registry=registry)
    def trainer_jobs(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> dict[Any, Any]:
        return {(namespace, name): _plain(body)}

    @kopf.on.event(*FTJ, id="count_phase", registry=registry)
    def count_phase(event: Mapping[str, Any], uid: str, status: Mapping[str, Any], **_: Any) -> None:
        if event.get("type") == "DELETED":
            phases.pop(uid, None)
        else:
            phases[uid] = status.get("phase") or "Pending"

    # --- launching an attempt ------------------------------------------------------------------------

    async def launch(*, body: kopf.Body, status_: Mapping[str, Any], patch: kopf.Patch, logger: Any,
                     nodes: kopf.Index, pods: kopf.Index, attempt: int, reason: str | None = None,
                     note: str = "") -> None:
        meta = body["metadata"]
        attempts = list(status_.get("attempts") or [])
        floor = _oom_floor(attempts, catalog)
        try:
            spec = parse_spec(dict(body.get("spec") or {}))
            plan = _plan(spec, floor)
        except PlanError as exc:
            failed_reason = "NoLargerGpuClass" if floor else "Unplannable"
            write(body, status_, patch, phase="Failed", reason=failed_reason, message="; ".join(exc.problems))
            return
        except SpecError as exc:
            write(body, status_, patch, phase="Failed", reason="InvalidSpec", message="; ".join(exc.problems))
            return

        if floor and catalog.get(plan.gpu_class, "plan").memory_bytes <= catalog.get(floor, "plan").memory_bytes:
            write(body, status_, patch, phase="Failed", reason="NoLargerGpuClass",
                  message=f"the job ran out of GPU memory on {floor} and spec.resources.gpuClass pins "
                          f"{plan.gpu_class}; set gpuClass: auto (with maxGpuClass) or pin a larger class")
            return
        fields = st.plan_fields(plan)
        queue = resources.queue_name(spec, dict(meta.get("labels") or {}))
        placement = place(plan.gpu_class, plan.gpu_count, _inventory(nodes, pods), catalog)
        if placement.kind == "NoNodes" and settings.wait_for_nodes and not queue:
            metrics.placement_failures.labels(plan.gpu_class).inc()
            write(body, status_, patch, phase="Pending", reason="NoMatchingNodes", message=placement.message,
                  warning=True, **fields)
            return

        owner = resources.Owner(meta["name"], meta["namespace"], meta["uid"], dict(meta.get("labels") or {}))
        gpu = catalog.get(plan.gpu_class, "status.plan.gpuClass")
        config = resources.config_map(owner, spec, plan, attempt, settings)
        job = resources.trainer_job(owner, spec, plan, gpu, attempt, settings)
        await kube.create_or_adopt(config, owner.uid, patch_settings(), logger)
        _, created = await kube.create_or_adopt(job, owner.uid, patch_settings(), logger)
        if created:
            metrics.jobs_created.inc()
        job_name = job["metadata"]["name"]
        if spec.suspend:
            phase: st.Phase = "Suspended"
            why, text = "Suspended", f"spec.suspend is true; {job_name} is suspended"
        elif queue:
            phase, why = "Queued", "WaitingForKueue"
            text = f"{job_name} on {plan.gpu_class} x{plan.gpu_count} waits for admission by Kueue queue {queue}"
        else:
            phase, why = "Queued", "JobCreated"
            text = f"{job_name} on {plan.gpu_class} x{plan.gpu_count}, estimate {fields['vram']}: {placement.message}"
        write(body, status_, patch, phase=phase, reason=reason or why, message=(note + text) if note else text,
              warning=bool(note), jobName=job_name,
              attempts=_with_attempt(attempts, attempt, gpuClass=plan.gpu_class, jobName=job_name,
                                     outcome="Pending", startedAt=st.now_iso()),
              **fields)

    def _plan(spec: FineTuneJobSpec, above: str | None) -> Plan:
        arch = resolve_architecture(spec.model.name, spec.model.source, _s3_config_reader())
        return make_plan(spec, arch, catalog, above=above)

    kopf_settings: dict[str, kopf.OperatorSettings] = {}

    def patch_settings() -> kopf.OperatorSettings:
        return kopf_settings["settings"]

    @kopf.on.startup(id="remember_settings", registry=registry)
    def remember_settings(settings: kopf.OperatorSettings, **_: Any) -> None:
        kopf_settings["settings"] = settings

    # --- create / resume / spec changes --------------------------------------------------------------

    async def on_create(body: kopf.Body, status: Mapping[str, Any], patch: kopf.Patch, logger: Any,
                        gpu_nodes: kopf.Index, gpu_pods: kopf.Index, **_: Any) -> None:
        phase = status.get("phase")
        if phase and (phase in ("Succeeded", "Failed") or status.get("jobName")):
            return  # already launched (the operator restarted after writing status)
        await launch(body=body, status_=status, patch=patch, logger=logger, nodes=gpu_nodes, pods=gpu_pods,
                     attempt=_next_attempt(status.get("attempts") or []))

    async def on_spec(body: kopf.Body, status: Mapping[str, Any], patch: kopf.Patch, logger: Any,
                      gpu_nodes: kopf.Index, gpu_pods: kopf.Index, diff: Any, **_: Any) -> None:
        phase = status.get("phase")
        attempts = status.get("attempts") or []
        if phase == "Failed" or not status.get("jobName"):
            await launch(body=body, status_=status, patch=patch, logger=logger, nodes=gpu_nodes, pods=gpu_pods,
                         attempt=_next_attempt(attempts))
            return
        if phase == "Succeeded":
            return
        spec = body.get("spec") or {}
        suspend = bool(spec.get("suspend"))
        changed = {".".join(map(str, d[1])) for d in diff}
        job_name = status["jobName"]
        if suspend or not spec.get("queue") or (body["metadata"].get("labels") or {}).get(resources.QUEUE_LABEL):
            await kube.set_job_suspend(body["metadata"]["namespace"], job_name, suspend, patch_settings(), logger)
        if suspend:
            write(body, status, patch, phase="Suspended", reason="Suspended",
                  message=f"spec.suspend is true; {job_name} is suspended (checkpoints are kept)")
        elif phase == "Suspended":
            write(body, status, patch, phase="Queued", reason="Resumed",
                  message=f"spec.suspend is false; {job_name} resumes from its last checkpoint")
        others = sorted(c for c in changed if c not in ("suspend", ""))
        if others:
            kopf.event(body, type="Warning", reason="SpecChangeIgnored",
                       message=f"{', '.join('spec.' + c for c in others)} changed while {job_name} runs; "
                               f"changes apply to the next attempt (delete and re-apply to restart now)")
            patch.status["observedGeneration"] = body["metadata"].get("generation")

    kopf.on.create(*FTJ, id="launch", registry=registry)(timed("create", on_create))
    kopf.on.resume(*FTJ, id="resume", registry=registry)(timed("resume", on_create))
    kopf.on.update(*FTJ, id="spec", field="spec", registry=registry)(timed("update", on_spec))

    # --- following the running attempt ----------------------------------------------------------------

    async def follow(body: kopf.Body, status: Mapping[str, Any], patch: kopf.Patch, logger: Any,
                     gpu_nodes: kopf.Index, gpu_pods: kopf.Index, trainer_jobs: kopf.Index,
                     trainer_pods: kopf.Index, namespace: str, **_: Any) -> None:
        phase = status.get("phase")
        if phase in st.TERMINAL_PHASES:
            return
        attempts = list(status.get("attempts") or [])
        job_name = status.get("jobName")
        if not job_name:
            # Pending: no node of the class yet, try placing again. No phase: the status write after a
            # launch was lost (a conflict after kopf recorded the spec as handled); launch again (idempotent).
            if phase in ("Pending", None):
                await launch(body=body, status_=status, patch=patch, logger=logger, nodes=gpu_nodes,
                             pods=gpu_pods, attempt=_next_attempt(attempts))
            return
        number = next((a["attempt"] for a in attempts if a.get("jobName") == job_name), max(1, len(attempts)))
        job = next(iter(trainer_jobs.get((namespace, job_name), [])), None)
        pods = list(trainer_pods.get((namespace, job_name), []))
        outcome = st.observe(job, pods, settings.trainer_port)
        spec = body.get("spec") or {}
        plan = status.get("plan") or {}

        if outcome.state == "Running":
            progress = await _poll_trainer(outcome.pod_ip, outcome.port, logger)
            extra = st.progress_fields(progress) if progress else {}
            write(body, status, patch, phase="Running", reason="Training", message=outcome.message,
                  attempts=_with_attempt(attempts, number, outcome="Running"), **extra)
        elif outcome.state == "Succeeded":
            summary = outcome.summary
            uri = summary.get("adapterUri") or summary.get("adapter_uri") or \
                (spec.get("output") or {}).get("uri", "").rstrip("/") + "/adapter/"
            progress = dict(status.get("progress") or {})
            final_loss = summary.get("finalLoss", summary.get("final_loss", summary.get("loss")))
            steps = summary.get("steps")
            if final_loss is not None:
                progress["loss"] = float(final_loss)
            if steps is not None:
                progress["step"] = int(steps)
            if summary.get("peakMemoryBytes") is not None:
                progress["peakMemoryBytes"] = int(summary["peakMemoryBytes"])
            progress["updatedAt"] = st.now_iso()
            write(body, status, patch, phase="Succeeded", reason="Succeeded",
                  message=f"adapter written to {uri}", adapterUri=uri,
                  attempts=_with_attempt(attempts, number, outcome="Succeeded", finishedAt=st.now_iso()),
                  **st.progress_fields(progress))
        elif outcome.state == "OutOfMemory":
            done = _with_attempt(attempts, number, outcome="OutOfMemory", message=outcome.message,
                                 finishedAt=st.now_iso())
            was = plan.get("gpuClass", "?")
            interim = {**dict(status), "attempts": done}
            patch.status["attempts"] = done
            await launch(body=body, status_=interim, patch=patch, logger=logger, nodes=gpu_nodes, pods=gpu_pods,
                         attempt=number + 1, reason="OutOfMemoryEscalated",
                         note=f"attempt {number} on {was} ran out of GPU memory ({outcome.message}); re-planned "
                              f"one class up, resuming from the last checkpoint: ")
            new_class = (patch.status.get("plan") or {}).get("gpuClass")
            if patch.status.get("phase") != "Failed" and new_class:
                metrics.oom_escalations.labels(was, new_class).inc()
            if not patch.status.get("jobName"):  # no larger class, or no node of it yet: this attempt is over
                patch.status["jobName"] = None
        elif outcome.state == "Failed":
            write(body, status, patch, phase="Failed", reason="TrainingFailed", message=outcome.message,
                  attempts=_with_attempt(attempts, number, outcome="Failed", message=outcome.message,
                                         finishedAt=st.now_iso()))
        elif outcome.state == "Suspended":
            if spec.get("suspend"):
                write(body, status, patch, phase="Suspended", reason="Suspended",
                      message=f"spec.suspend is true; {job_name} is suspended (checkpoints are kept)")
            elif phase == "Running":
                write(body, status, patch, phase="Queued", reason="Preempted",
                      message=f"{job_name} was suspended (preempted by its queue); it resumes from its last "
                              "checkpoint when admitted again", warning=True)
        elif phase == "Running":  # Waiting after Running: the pod went away (disruption); the Job makes a new one
            write(body, status, patch, phase="Queued", reason="Rescheduling", message=outcome.message)

    async def _poll_trainer(ip: str | None, port: int | None, logger: Any) -> dict[str, Any] | None:
        if not ip or not port:
            return None
        url = f"http://{ip}:{port}/status"
        try:
            timeout = aiohttp.ClientTimeout(total=min(5.0, settings.poll_interval))
            async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as response:
                if response.status != 200:
                    return None
                data = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            logger.debug(f"trainer /status at {url} not reachable: {exc!r}")
            return None
        return st.parse_trainer_status(data, st.now_iso()) if isinstance(data, dict) else None

    kopf.timer(*FTJ, id="follow", interval=settings.poll_interval, initial_delay=settings.poll_interval,
               registry=registry)(timed("follow", follow))


def _plain(body: Mapping[str, Any]) -> dict[str, Any]:
    """A detached copy of a watched body (kopf bodies are live views)."""
    def copy(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: copy(v) for k, v in value.items()}
        if isinstance(value, list):
            return [copy(v) for v in value]
        return value

    return {k: copy(body.get(k)) for k in ("metadata", "spec", "status")}


__all__ = ["GPU_RESOURCE", "register"]
