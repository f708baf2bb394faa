"""Every decision the operator makes about one FineTuneJob, as one pure function: `reconcile(snapshot) -> Actions`.

The snapshot is what the operator knows (the FineTuneJob, its status as last written, the current attempt's
Job and pods, the cluster's GPU inventory, the trainer's /status when polled); the actions are what to do
(children to create, a Job to suspend or resume, the status patch, the Events, metric increments). The
handlers read, call this, and apply the actions; nothing here does I/O, so the tables in
tests/operator/test_reconcile.py cover every phase transition.

One reconcile:

    no status, a new spec after Failed, or Pending -> launch: parse spec -> plan -> place -> children
    Succeeded + new spec                           -> Event SpecChangeIgnored
    an attempt exists + new spec                   -> suspend/resume its Job, or Event SpecChangeDeferred
    an attempt exists                              -> follow: snapshot.outcome -> Running / Succeeded /
                                                      OutOfMemory (-> launch the next attempt one class up) /
                                                      a failed multi-node attempt (-> the next attempt, all
                                                      ranks from the last checkpoint) /
                                                      Failed / Suspended / Preempted / Rescheduling
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from kubetune import serving
from kubetune.contracts import TERMINAL_PHASES, ExitCode, Phase, Reason, TerminationSummary, TrainerStatus
from kubetune.errors import HubUnreachable, PlanError, SpecError
from kubetune.planning.gpus import GpuCatalog
from kubetune.planning.placement import Inventory, place
from kubetune.planning.plan import Plan
from kubetune.quota import Ask, Limits, Usage, decide
from kubetune.spec import Attempt, FineTuneJobSpec, parse_spec
from kubetune.wire import AttemptOutcome
from kubetune_operator import resources, scaleout
from kubetune_operator import status as st
from kubetune_operator.settings import Settings
from kubetune_operator.shape import shape_of
from kubetune_operator.status import ObservedState

FINISHED = frozenset(o for o in AttemptOutcome if o.finished)  # after these the next launch is a new attempt

Planner = Callable[[FineTuneJobSpec, "str | None"], Plan]  # (spec, OOM floor class) -> Plan


@dataclass(frozen=True)
class Snapshot:
    body: Mapping[str, Any]  # the FineTuneJob (metadata and spec from the watch)
    status: Mapping[str, Any]  # its status as this operator last wrote it
    trainer_job: Mapping[str, Any] | None  # the current attempt's Job (status.jobName), if any
    pods: tuple[Mapping[str, Any], ...]  # that Job's pods
    outcome: st.Outcome  # status.observe(trainer_job, pods): what they say, observed once by the reader
    inventory: Inventory
    catalog: GpuCatalog
    settings: Settings
    planner: Planner  # make_plan against the cluster's supply (the handlers cache it)
    now: str
    trainer_status: TrainerStatus | None = None  # the running trainer's /status, when the timer polled it
    child_conflict: str | None = None  # creating a child met an object of that name that is not ours
    jobset_api: str | None = None  # the cluster serves JobSets (scaleout.jobset_api): multi-node attempts use one
    quota: Limits | None = None  # the namespace's quota (kubetune.quota), if the platform set one
    usage: Usage = field(default_factory=Usage)  # what the namespace's other jobs hold


Counter = Literal["placement_failures", "oom_escalations", "jobs_created"]


@dataclass
class Actions:
    status: dict[str, Any] = field(default_factory=dict)  # merge patch for .status (None deletes a key)
    events: list[st.Event] = field(default_factory=list)
    create: list[dict[str, Any]] = field(default_factory=list)  # children, in order (ConfigMap before Job)
    suspend_job: tuple[str, bool] | None = None  # (Job name, spec.suspend)
    counters: list[tuple[Counter, tuple[str, ...]]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.status or self.events or self.create or self.suspend_job)


class _Job:
    """The FineTuneJob being decided: its status as it will be after the patch, and the actions so far."""

    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap
        self.meta: Mapping[str, Any] = snap.body.get("metadata") or {}
        self.spec: Mapping[str, Any] = snap.body.get("spec") or {}
        self.status: dict[str, Any] = dict(snap.status)
        self.actions = Actions()

    @property
    def generation(self) -> int | None:
        return self.meta.get("generation")

    def write(self, *, phase: Phase, reason: Reason, message: str, warning: bool = False, **fields: Any) -> None:
        changes, event = st.transition(self.status, phase=phase, reason=reason, message=message,
                                       generation=self.generation, warning=warning, now=self.snap.now, **fields)
        self.set(**changes)
        if event is not None:
            self.actions.events.append(event)

    def set(self, **fields: Any) -> None:
        self.actions.status.update(fields)
        for key, value in fields.items():
            if value is None:
                self.status.pop(key, None)
            else:
                self.status[key] = value

    def event(self, reason: Reason, message: str) -> None:
        self.actions.events.append(st.Event("Warning", reason, message))


# --- attempts (status.attempts) -----------------------------------------------------------------------------

def oom_floor(attempts: Iterable[Mapping[str, Any]], catalog: GpuCatalog) -> str | None:
    """The largest class an earlier attempt ran out of memory on: re-plans go strictly above it."""
    classes = [a["gpuClass"] for a in attempts
               if a.get("outcome") == AttemptOutcome.OUT_OF_MEMORY and a.get("gpuClass")]
    known = [catalog.get(c, "status.attempts.gpuClass") for c in classes if c in catalog.names]
    return max(known, key=lambda g: g.memory_bytes).name if known else None


def next_attempt(attempts: Iterable[Mapping[str, Any]]) -> int:
    """The attempt to launch: the last one again unless it finished (a launch is idempotent per number)."""
    last = max(attempts, key=lambda a: a.get("attempt", 0), default=None)
    if last is None:
        return 1
    return int(last["attempt"]) + (1 if last.get("outcome") in FINISHED else 0)


def with_attempt(attempts: Iterable[Mapping[str, Any]], number: int, outcome: AttemptOutcome, *,
                 gpu_class: str | None = None, job_name: str | None = None, message: str | None = None,
                 started_at: str | None = None, finished_at: str | None = None,
                 resumed_from_step: int | None = None) -> list[dict[str, Any]]:
    """The attempts list with entry `number` created (a launch gives its class and Job) or updated (the fields
    given; None keeps what the entry has), as the CRD's `Attempt` dumped camelCase (lists are replaced whole by
    merge patches). Entries come from status as written, which the API server validates against that schema."""
    fields = {"outcome": outcome, "gpu_class": gpu_class, "job_name": job_name, "message": message,
              "started_at": started_at, "finished_at": finished_at, "resumed_from_step": resumed_from_step}
    given: dict[str, Any] = {key: value for key, value in fields.items() if value is not None}
    result = [dict(a) for a in attempts]
    index = next((i for i, entry in enumerate(result) if entry.get("attempt") == number), None)
    was = {"attempt": number} if index is None else Attempt.model_validate(result[index]).model_dump(exclude_unset=True)
    entry = Attempt.model_validate({**was, **given}).model_dump(by_alias=True, exclude_unset=True)
    if index is None:
        return sorted([*result, entry], key=lambda a: a["attempt"])
    result[index] = entry
    return result


# --- the one decision ---------------------------------------------------------------------------------------

def reconcile(snap: Snapshot) -> Actions:
    job = _Job(snap)
    phase = job.status.get("phase")
    spec_changed = job.status.get("observedGeneration") not in (None, job.generation)
    if phase is None or (spec_changed and (phase == Phase.FAILED or not job.status.get("jobName"))):
        _launch(job, next_attempt(job.status.get("attempts") or []))
        return job.actions
    if spec_changed and phase == Phase.SUCCEEDED:
        job.event(Reason.SPEC_CHANGE_IGNORED, "the fine-tune has succeeded; apply a new FineTuneJob (another name) "
                                              "to train again")
        job.set(observedGeneration=job.generation)
    elif spec_changed:
        _spec_change(job)
        if job.actions.suspend_job is not None:
            return job.actions  # the Job's own state shows the change on a later event; not followed before that
    if phase in TERMINAL_PHASES:
        return job.actions
    if not job.status.get("jobName"):  # Pending: no node of the class yet; plan and place again
        _launch(job, next_attempt(job.status.get("attempts") or []))
        return job.actions
    _follow(job)
    return job.actions


def _launch(job: _Job, attempt: int, reason: Reason | None = None, note: str = "") -> None:
    snap = job.snap
    attempts = list(job.status.get("attempts") or [])
    floor = oom_floor(attempts, snap.catalog)
    try:
        spec = parse_spec(dict(job.spec))
        plan = snap.planner(spec, floor)
    except PlanError as exc:
        job.write(phase=Phase.FAILED, reason=Reason.NO_LARGER_GPU_CLASS if floor else Reason.UNPLANNABLE,
                  message="; ".join(exc.problems))
        return
    except SpecError as exc:
        job.write(phase=Phase.FAILED, reason=Reason.INVALID_SPEC, message="; ".join(exc.problems))
        return
    except HubUnreachable as exc:
        job.write(phase=Phase.PENDING, reason=Reason.MODEL_CONFIG_UNREACHABLE, warning=True,
                  message=f"{note}{exc}; planned again every {snap.settings.poll_interval:g}s")
        return

    fields = st.plan_fields(plan)
    if _over_quota(job, plan, note, fields):
        return
    labels = dict(job.meta.get("labels") or {})
    queue = resources.queue_name(spec, labels)
    gpu = snap.catalog.get(plan.gpu_class, "status.plan.gpuClass")
    try:
        shape = shape_of(scaleout.strategy_of(spec, plan), plan.gpu_count, gpu)  # decided once, passed down
    except ValueError as exc:
        job.write(phase=Phase.FAILED, reason=Reason.UNPLANNABLE, message=str(exc))
        return
    placement = place(plan.gpu_class, shape.gpus_per_node, snap.inventory, snap.catalog, nodes=shape.nodes)
    if placement.kind == "NoNodes" and snap.settings.wait_for_nodes and not queue and not gpu.provisionable:
        if job.status.get("phase") != Phase.PENDING:
            job.actions.counters.append(("placement_failures", (plan.gpu_class,)))
        job.write(phase=Phase.PENDING, reason=Reason.NO_MATCHING_NODES, message=note + placement.message,
                  warning=True, **fields)
        return
    if snap.child_conflict:
        job.write(phase=Phase.FAILED, reason=Reason.CHILD_NAME_TAKEN, message=snap.child_conflict)
        return

    owner = resources.Owner(job.meta["name"], job.meta["namespace"], job.meta["uid"], labels)
    children = scaleout.trainer_children(owner, spec, plan, gpu, shape, attempt, snap.settings, snap.jobset_api)
    job.actions.create = [resources.config_map(owner, spec, plan, attempt, snap.settings), *children]
    name = scaleout.workload_name(children)
    if spec.suspend:
        phase, why = Phase.SUSPENDED, Reason.SUSPENDED
        text = f"spec.suspend is true; {name} is suspended"
    elif queue:
        phase, why = Phase.QUEUED, Reason.WAITING_FOR_KUEUE
        text = f"{name} on {plan.gpu_class} x{plan.gpu_count} waits for admission by Kueue queue {queue}"
    else:
        phase, why = Phase.QUEUED, Reason.JOB_CREATED
        where = placement.message if placement.kind != "NoNodes" else \
            f"no node yet; {plan.gpu_class} is provisionable, the Job's pending pod asks the autoscaler for one"
        text = f"{name} on {plan.gpu_class} x{plan.gpu_count}, estimate {fields['vram']}: {where}"
    job.write(phase=phase, reason=reason or why, message=note + text, warning=bool(note), jobName=name,
              attempts=with_attempt(attempts, attempt, AttemptOutcome.PENDING, gpu_class=plan.gpu_class,
                                    job_name=name, started_at=snap.now),
              **fields)


def _over_quota(job: _Job, plan: Plan, note: str, fields: Mapping[str, Any]) -> bool:
    """The namespace's quota (kubetune.quota, as the API decides at submit) refuses the plan: the job waits
    Pending, so `kubectl apply` cannot go around it."""
    snap = job.snap
    refusal = decide(snap.quota, snap.usage, Ask(plan.gpu_class, plan.gpu_count, plan.estimated_cost))
    if refusal is not None:
        job.write(phase=Phase.PENDING, reason=Reason.QUOTA_EXCEEDED, warning=True, message=f"{note}namespace "
                  f"{job.meta.get('namespace')}: {refusal.message}; decided again every "
                  f"{snap.settings.poll_interval:g}s", **fields)
    return refusal is not None


def _spec_change(job: _Job) -> None:
    """A spec change while an attempt exists: suspend/resume its Job; other fields wait for the next attempt."""
    name = job.status["jobName"]
    trainer = job.snap.trainer_job
    suspend = bool(job.spec.get("suspend"))
    queued = job.spec.get("queue") or (job.meta.get("labels") or {}).get(resources.QUEUE_LABEL)
    job_suspended = bool(((trainer or {}).get("spec") or {}).get("suspend"))
    if suspend != (job.status.get("phase") == Phase.SUSPENDED):  # the change is (also) to spec.suspend
        if trainer is not None and suspend != job_suspended and (suspend or not queued):
            job.actions.suspend_job = (name, suspend)
        if suspend:
            job.write(phase=Phase.SUSPENDED, reason=Reason.SUSPENDED,
                      message=f"spec.suspend is true; {name} is suspended (checkpoints are kept)")
        else:
            job.write(phase=Phase.QUEUED, reason=Reason.RESUMED,
                      message=f"spec.suspend is false; {name} resumes from its last checkpoint"
                              + (f" when Kueue queue {queued} admits it" if queued else ""))
    else:
        job.event(Reason.SPEC_CHANGE_DEFERRED, f"the spec changed while {name} exists; changes apply to the next "
                                               "attempt (delete and re-apply the FineTuneJob to restart now)")
    job.set(observedGeneration=job.generation)


def _restart_gang(job: _Job, outcome: st.Outcome, attempts: list[dict[str, Any]]) -> bool:
    """A failed multi-node attempt is retried as a whole (a lone replacement pod cannot rejoin a running group):
    unless its input was bad, while the failed attempts so far are fewer than the Job backoff limit."""
    if not outcome.gang or outcome.exit_code in (ExitCode.BAD_INPUT, ExitCode.NO_GPU):
        return False
    return sum(1 for a in attempts if a.get("outcome") == AttemptOutcome.FAILED) < job.snap.settings.backoff_limit


def _essence(progress: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in progress.items() if k != "updatedAt" and v is not None}


def _serving(job: _Job, summary: TerminationSummary, uri: str) -> None:
    """status.serving (the ready-to-apply text) and, when the trainer checked the adapter, the ServingReady
    condition; a broken rule is also a Warning Event. Once per job: the first time it is seen succeeded."""
    if job.status.get("serving"):
        return
    try:
        spec = parse_spec(job.spec)
    except SpecError:  # edited to something invalid after it succeeded: no text to render from it
        return
    name, namespace = job.meta.get("name", "adapter"), job.meta.get("namespace", "default")
    findings = summary.serving
    gpus = int((job.status.get("plan") or {}).get("gpuCount") or 1)
    job.set(serving=serving.serving_status(name, namespace, spec, uri, findings, gpus))
    if findings is None:  # a trainer that did not check (an older image): the text, but no verdict
        return
    bad = serving.broken(findings)
    job.set(conditions=st.serving_condition(job.status.get("conditions") or [], not bad, serving.summary(findings),
                                            job.generation, job.snap.now))
    if bad:
        job.event(Reason.SERVING_RULES_BROKEN, "the adapter breaks serving rules: " + serving.summary(findings)
                  + f" (kubetune serve-manifest {name} -n {namespace})")


def _follow(job: _Job) -> None:
    """An attempt exists: what its workload and pods say (observed once, by the reader) moves the job on."""
    snap = job.snap
    name = job.status["jobName"]
    attempts = list(job.status.get("attempts") or [])
    number = next((a["attempt"] for a in attempts if a.get("jobName") == name), max(1, len(attempts)))
    outcome = snap.outcome
    phase = job.status.get("phase")
    if phase == Phase.SUSPENDED and job.spec.get("suspend") and \
            outcome.state in (ObservedState.RUNNING, ObservedState.WAITING):
        return  # the Job is being suspended (its watch lags the patch); its pod stops on its own

    if outcome.state is ObservedState.SETTLING:
        return  # the pod's exit (and its termination message) is on its way; the next event brings it
    if outcome.state is ObservedState.RUNNING:
        _running(job, outcome, attempts, number)
    elif outcome.state is ObservedState.SUCCEEDED:
        _succeeded(job, outcome.summary, attempts, number)
    elif outcome.state is ObservedState.OUT_OF_MEMORY:
        _out_of_memory(job, outcome, attempts, number)
    elif outcome.state is ObservedState.FAILED and _restart_gang(job, outcome, attempts):
        job.set(attempts=with_attempt(attempts, number, AttemptOutcome.FAILED, message=outcome.message,
                                      finished_at=snap.now))
        _launch(job, number + 1, reason=Reason.RANK_FAILED,
                note=f"attempt {number} failed ({outcome.message}); attempt {number + 1} restarts every rank from the "
                     "last checkpoint: ")
        if job.status.get("jobName") == name:  # no node for it yet: this attempt is over all the same
            job.set(jobName=None)
    elif outcome.state is ObservedState.FAILED:
        job.write(phase=Phase.FAILED, reason=st.failed_reason(outcome.exit_code), message=outcome.message,
                  attempts=with_attempt(attempts, number, AttemptOutcome.FAILED, message=outcome.message,
                                        finished_at=snap.now))
    elif outcome.state is ObservedState.SUSPENDED:
        if job.spec.get("suspend"):
            job.write(phase=Phase.SUSPENDED, reason=Reason.SUSPENDED,
                      message=f"spec.suspend is true; {name} is suspended (checkpoints are kept)")
        elif phase == Phase.RUNNING:
            job.write(phase=Phase.QUEUED, reason=Reason.PREEMPTED, warning=True,
                      message=f"{name} was suspended (preempted by its queue); it resumes from its last checkpoint "
                              "when admitted again")
    elif phase == Phase.RUNNING:  # the pod went away (a disruption); the Job controller makes a new one
        job.write(phase=Phase.QUEUED, reason=Reason.RESCHEDULING, message=outcome.message)


def _running(job: _Job, outcome: st.Outcome, attempts: list[dict[str, Any]], number: int) -> None:
    """Running: the trainer's /status (when the timer polled it) as progress, written only when it moved."""
    snap = job.snap
    progress = st.trainer_progress(snap.trainer_status, snap.now) if snap.trainer_status else None
    moved = progress and _essence(progress) != _essence(job.status.get("progress") or {})
    extra = st.progress_fields(progress, job.status.get("lossHistory") or []) if progress and moved else {}
    trainer = snap.trainer_status
    if trainer and trainer.model_commit:
        extra["modelCommit"] = trainer.model_commit
    job.write(phase=Phase.RUNNING, reason=Reason.TRAINING, message=outcome.message,
              attempts=with_attempt(attempts, number, AttemptOutcome.RUNNING,
                                    resumed_from_step=trainer.resumed_from_step if trainer else None), **extra)


def _succeeded(job: _Job, summary: TerminationSummary, attempts: list[dict[str, Any]], number: int) -> None:
    """Succeeded: the adapter's URI, the final progress and loss point, the evaluation (its Event once), and
    the serving text."""
    snap = job.snap
    uri = summary.adapter_uri or str((job.spec.get("output") or {}).get("uri", "")).rstrip("/") + "/adapter"
    progress = dict(job.status.get("progress") or {})
    if summary.final_loss is not None:
        progress["loss"] = summary.final_loss
    if summary.steps:
        progress["step"] = summary.steps
    if summary.total_steps:
        progress["totalSteps"] = summary.total_steps
    if summary.peak_memory_bytes is not None:
        progress["peakMemoryBytes"] = summary.peak_memory_bytes
    progress["updatedAt"] = snap.now
    evaluation = summary.evaluation
    result = st.result_status(evaluation) if evaluation else None
    told = job.status.get("result") == result  # the Event is sent once, not on every later reconcile
    job.write(phase=Phase.SUCCEEDED, reason=Reason.SUCCEEDED, message=f"adapter written to {uri}",
              adapterUri=uri, modelCommit=summary.model_commit, result=result,
              attempts=with_attempt(attempts, number, AttemptOutcome.SUCCEEDED, finished_at=snap.now,
                                    resumed_from_step=summary.resumed_from_step),
              **st.progress_fields(progress, job.status.get("lossHistory") or [], final=True))
    if evaluation is not None and not told:
        job.actions.events.append(st.result_event(evaluation))
    _serving(job, summary, uri)


def _out_of_memory(job: _Job, outcome: st.Outcome, attempts: list[dict[str, Any]], number: int) -> None:
    """Out of memory: this attempt is over; the next one is planned one class up, from the last checkpoint."""
    name = job.status["jobName"]
    was = (job.status.get("plan") or {}).get("gpuClass", "?")
    job.set(attempts=with_attempt(attempts, number, AttemptOutcome.OUT_OF_MEMORY, message=outcome.message,
                                  finished_at=job.snap.now, resumed_from_step=outcome.summary.resumed_from_step))
    _launch(job, number + 1, reason=Reason.OUT_OF_MEMORY_ESCALATED,
            note=f"attempt {number} on {was} ran out of GPU memory ({outcome.message}); re-planned one class "
                 "up, resuming from the last checkpoint: ")
    new_class = (job.status.get("plan") or {}).get("gpuClass")
    if job.status.get("phase") != Phase.FAILED and new_class:
        job.actions.counters.append(("oom_escalations", (was, new_class)))
    if job.status.get("jobName") == name:  # no larger class, or no node of it yet: this attempt is over
        job.set(jobName=None)
