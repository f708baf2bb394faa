"""Status transitions (pure): phase + kstatus conditions + the Event that announces the change.

Conditions follow the kstatus conventions that Argo CD and Flux read:
- `Ready`: True only when the fine-tune succeeded (the adapter is written).
- `Reconciling`: True while the operator or the trainer is still working towards that.
- `Stalled`: True when nothing will change without a human (invalid spec, training failed for good).
`lastTransitionTime` moves only when a condition's status flips; `observedGeneration` is the spec
generation the status describes.

Also here: reading a trainer attempt's outcome from its Job and pods (`observe`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

from kubetune import wire
from kubetune.contracts import (
    TERMINAL_PHASES,
    ConditionType,
    EvalSummary,
    ExitCode,
    Phase,
    Reason,
    TerminationSummary,
    TrainerStatus,
)
from kubetune.planning.plan import Plan
from kubetune.planning.vram import GiB
from kubetune.spec import EvalAnswerStatus, PlanStatus, Progress, ResultStatus
from kubetune_operator.resources import CONTAINER
from kubetune_operator.scaleout import COMPLETION_INDEX, JOBSET_JOB_INDEX

__all__ = ["TERMINAL_PHASES", "Phase", "Reason"]

# (Ready, Reconciling, Stalled) per phase.
_CONDITIONS: dict[Phase, tuple[str, str, str]] = {
    Phase.PENDING: ("False", "True", "False"),
    Phase.QUEUED: ("False", "True", "False"),
    Phase.RUNNING: ("False", "True", "False"),
    Phase.SUSPENDED: ("False", "False", "False"),
    Phase.SUCCEEDED: ("True", "False", "False"),
    Phase.FAILED: ("False", "False", "True"),
}


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: Reason
    message: str


def conditions(previous: Iterable[Mapping[str, Any]], phase: Phase, reason: Reason, message: str,
               generation: int | None, now: str) -> list[dict[str, Any]]:
    """Ready, Reconciling, Stalled. The transition's reason goes on Ready and on whichever of the others is
    True; a False Reconciling or Stalled carries its own idle reason (kubetune.contracts.CONDITION_REASONS)."""
    previous = list(previous)
    old = {c.get("type"): c for c in previous}
    ready, reconciling, stalled = _CONDITIONS[Phase(phase)]
    idle = {ConditionType.RECONCILING: Reason.NOT_RECONCILING, ConditionType.STALLED: Reason.NOT_STALLED}
    result = []
    for ctype, cstatus in ((ConditionType.READY, ready), (ConditionType.RECONCILING, reconciling),
                           (ConditionType.STALLED, stalled)):
        prior = old.get(ctype) or {}
        changed = prior.get("status") != cstatus or not prior.get("lastTransitionTime")
        own = ctype is ConditionType.READY or cstatus == "True"
        result.append({
            "type": ctype.value,
            "status": cstatus,
            "reason": Reason(reason).value if own else idle[ctype].value,
            "message": message if own else "",
            "lastTransitionTime": now if changed else prior["lastTransitionTime"],
            "observedGeneration": generation,
        })
    kstatus = {c["type"] for c in result}
    return result + [dict(c) for c in previous if c.get("type") not in kstatus]  # ServingReady stays as it is


def serving_condition(previous: Iterable[Mapping[str, Any]], ready: bool, message: str, generation: int | None,
                      now: str) -> list[dict[str, Any]]:
    """The conditions with ServingReady set (True: every serving rule met; False: the message says which broke)."""
    kept = [dict(c) for c in previous if c.get("type") != ConditionType.SERVING_READY]
    prior = next((c for c in previous if c.get("type") == ConditionType.SERVING_READY), {})
    status = "True" if ready else "False"
    condition = {
        "type": ConditionType.SERVING_READY.value, "status": status,
        "reason": (Reason.SERVING_RULES_MET if ready else Reason.SERVING_RULES_BROKEN).value,
        "message": message,
        "lastTransitionTime": prior.get("lastTransitionTime") if prior.get("status") == status else now,
        "observedGeneration": generation,
    }
    return [*kept, condition]


def transition(current: Mapping[str, Any], *, phase: Phase, reason: Reason, message: str,
               generation: int | None, now: str | None = None,
               warning: bool = False, **fields: Any) -> tuple[dict[str, Any], Event | None]:
    """The status patch (only what changes) and the Event for it (None when phase and reason stay).

    `fields` are further status keys (camelCase) such as plan, gpu, vram, jobName, attempts.
    """
    when = now or now_iso()
    phase, reason = Phase(phase), Reason(reason)
    desired: dict[str, Any] = {
        "phase": phase.value,
        "message": message,
        "observedGeneration": generation,
        **{k: v for k, v in fields.items() if v is not None},
    }
    previous_conditions = current.get("conditions") or []
    new_conditions = conditions(previous_conditions, phase, reason, message, generation, when)
    if _strip_times(new_conditions) != _strip_times(previous_conditions):
        desired["conditions"] = new_conditions
    patch = {k: v for k, v in desired.items() if current.get(k) != v}
    old_reason = next((c.get("reason") for c in previous_conditions if c.get("type") == "Ready"), None)
    event = None
    if current.get("phase") != phase or old_reason != reason:
        kind: Literal["Normal", "Warning"] = "Warning" if warning or phase is Phase.FAILED else "Normal"
        event = Event(kind, reason, f"{phase.value}: {message}")
    return patch, event


def _strip_times(conds: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in c.items() if k != "lastTransitionTime"} for c in conds]


# --- display fields -----------------------------------------------------------------------------------

def gpu_text(gpu_class: str, count: int, strategy: str = "single", nodes: int = 1) -> str:
    """The GPU column of `kubectl get ftj`: 'L4 x1', 'L4 x4 FSDP', 'A10G x2 DDP, 2 nodes', 'A100-40GB x2 split'."""
    how = {"ddp": " DDP", "fsdp": " FSDP", "pipeline": " split"}.get(strategy, "") if count > 1 else ""
    return f"{gpu_class} x{count}{how}" + (f", {nodes} nodes" if nodes > 1 else "")


def vram_text(estimate_bytes: int) -> str:
    return f"{estimate_bytes / GiB:.1f}Gi"


def plan_status(plan: Plan) -> dict[str, Any]:
    """status.plan: the CRD's model (kubetune.spec.PlanStatus), dumped camelCase for the merge patch."""
    return PlanStatus(gpu_class=plan.gpu_class, gpu_count=plan.gpu_count, strategy=plan.strategy, nodes=plan.nodes,
                      vram_estimate_bytes=plan.vram_estimate_bytes, knobs=plan.knobs.model_dump(by_alias=True),
                      reasons=list(plan.reasons)).model_dump(by_alias=True, exclude_unset=True)


def plan_fields(plan: Plan) -> dict[str, Any]:
    return {"plan": plan_status(plan), "gpu": gpu_text(plan.gpu_class, plan.gpu_count, plan.strategy, plan.nodes),
            "vram": vram_text(plan.vram_estimate_bytes)}


def step_text(step: int | None, total: int | None) -> str | None:
    if step is None:
        return None
    return f"{step}/{total}" if total else str(step)


def loss_text(loss: float | None) -> str | None:
    return None if loss is None else f"{loss:.3f}"


def with_percent(progress: Mapping[str, Any]) -> dict[str, Any]:
    """status.progress with `percent` (step / totalSteps, 0-100) when both are known."""
    result = dict(progress)
    if result.get("totalSteps") and result.get("step") is not None:
        result["percent"] = min(100, int(100 * result["step"] / result["totalSteps"]))
    return result


LOSS_POINTS = 200  # status.lossHistory holds at most this many


def loss_history(history: Iterable[Mapping[str, Any]], step: int | None, loss: float | None,
                 limit: int = LOSS_POINTS, force: bool = False) -> list[dict[str, Any]]:
    """status.lossHistory with (step, loss) added: a point closer than 2 x span/limit steps to the last is skipped
    (unless `force`: the final loss), a resume from an earlier checkpoint drops the points after it, and past
    `limit` every other point goes, so the curve stays evenly sampled and bounded."""
    points = [{"step": int(p["step"]), "loss": float(p["loss"])} for p in history
              if isinstance(p.get("step"), int) and isinstance(p.get("loss"), int | float)]
    if step is None or loss is None:
        return points
    points = [p for p in points if p["step"] < step] if points and points[-1]["step"] >= step else points
    gap = 2 * (points[-1]["step"] - points[0]["step"]) / limit if len(points) > 1 else 0
    if points and not force and step - points[-1]["step"] < gap:
        return points
    points.append({"step": step, "loss": round(loss, 4)})
    if len(points) > limit:
        points = points[::2] if len(points) % 2 else [*points[::2], points[-1]]
    return points


def progress_fields(progress: Mapping[str, Any], history: Iterable[Mapping[str, Any]] | None = None,
                    final: bool = False) -> dict[str, Any]:
    """status.progress and the display fields; with `history` (status.lossHistory) also the curve, extended."""
    progress = with_percent(progress)
    fields: dict[str, Any] = {"progress": progress, "loss": loss_text(progress.get("loss")),
                              "step": step_text(progress.get("step"), progress.get("totalSteps"))}
    if history is not None:
        fields["lossHistory"] = loss_history(history, progress.get("step"), progress.get("loss"), force=final)
    return fields


def trainer_progress(data: TrainerStatus, now: str) -> dict[str, Any]:
    """The trainer's /status document -> status.progress (the CRD's model, kubetune.spec.Progress, camelCase)."""
    return with_percent(Progress(
        step=data.step, total_steps=data.total_steps or None, loss=data.loss,
        tokens_per_second=data.tokens_per_second, eta_seconds=data.eta_seconds,
        peak_memory_bytes=data.peak_memory_bytes or None, updated_at=now,
    ).model_dump(by_alias=True, exclude_unset=True))


# --- the outcome of one trainer attempt ------------------------------------------------------------------

class ObservedState(StrEnum):
    """What an attempt's workload and pods say (`observe`); reconcile._follow moves the job on by it."""

    WAITING = "Waiting"
    """No pod runs yet (scheduling, a gang's rendezvous)."""
    SETTLING = "Settling"
    """The workload has finished but the pod that says how has not shown its exit yet (the Job's watch stream ran
    ahead of the pods'): nothing moves until it does."""
    SUSPENDED = "Suspended"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    OUT_OF_MEMORY = "OutOfMemory"
    """Out of GPU memory (exit code 3) or OOMKilled on any pod: the same class cannot hold it."""
    FAILED = "Failed"


# exit codes that name why an attempt failed
CAUSES = (ExitCode.BAD_INPUT, ExitCode.OOM, ExitCode.STORAGE, ExitCode.NO_GPU)


@dataclass(frozen=True)
class Outcome:
    state: ObservedState
    message: str = ""
    summary: TerminationSummary = field(default_factory=TerminationSummary)  # the trainer's termination message
    pod_ip: str | None = None
    port: int | None = None
    gang: bool = False  # a multi-node attempt: one pod per node, which fail and finish together
    exit_code: int | None = None  # the exit code the attempt failed with, when a pod's is known


# exit codes that fail the Job at once (podFailurePolicy), with what to say when the pod left no summary
FAILED_AT_ONCE = {ExitCode.BAD_INPUT: "the trainer rejected its input (exit code 2)",
                  ExitCode.NO_GPU: "the plan runs this job on a GPU but the trainer found no usable CUDA on its node "
                                   "(exit code 5): check the node's NVIDIA driver and device plugin"}


def failed_reason(exit_code: int | None) -> Reason:
    """The reason of a Failed attempt: GpuUnavailable says a node's driver or device plugin needs a human."""
    return Reason.GPU_UNAVAILABLE if exit_code == ExitCode.NO_GPU else Reason.TRAINING_FAILED


EVENT_MESSAGE_LIMIT = 1000  # Kubernetes' event recorders keep about 1 KiB of a message


def result_status(evaluation: EvalSummary) -> dict[str, Any]:
    """status.result from the trainer's evaluation summary (the CRD's model, kubetune.spec.ResultStatus, camelCase)."""
    return ResultStatus(
        summary=evaluation.loss_line(), base_loss=evaluation.base_loss, adapter_loss=evaluation.adapter_loss,
        base_perplexity=evaluation.base_perplexity, adapter_perplexity=evaluation.adapter_perplexity,
        rows=evaluation.rows, answers=[EvalAnswerStatus(prompt=a.prompt, base=a.base, adapter=a.adapter)
                                       for a in evaluation.answers], eval_uri=evaluation.uri,
    ).model_dump(by_alias=True, exclude_unset=True)


def result_event(evaluation: EvalSummary) -> Event:
    """The Event that tells the evaluation: the losses, then the first answer of each model."""
    text = f"Evaluated: {evaluation.loss_line()}"
    if evaluation.answers:
        first = evaluation.answers[0]
        text += f"; {first.prompt!r}" + (f" base: {first.base!r}" if first.base is not None else "")
        text += f" adapter: {first.adapter!r}"
    if evaluation.uri:
        text += f"; all answers in {evaluation.uri}"
    return Event("Normal", Reason.EVALUATED, text[:EVENT_MESSAGE_LIMIT])


def termination_summary(message: str | None) -> TerminationSummary:
    return TerminationSummary.parse(message) or TerminationSummary()


def _terminated(pod: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") == CONTAINER:
            return (status.get("state") or {}).get("terminated")
    return None


def _live(pod: Mapping[str, Any]) -> bool:
    """The pod is shown pending or running with no exit yet (its final state may still be on its way)."""
    return _terminated(pod) is None and (pod.get("status") or {}).get("phase") in ("Pending", "Running")


def _job_condition(job: Mapping[str, Any], ctype: str) -> Mapping[str, Any] | None:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") == ctype and cond.get("status") == "True":
            return cond
    return None


def _error_text(summary: TerminationSummary, fallback: str) -> str:
    return summary.error or fallback


def gang_size(workload: Mapping[str, Any]) -> int:
    """How many pods run an attempt together: a JobSet's replicas x parallelism, an Indexed Job's completions,
    else 1 (a plain Job's pods are tries one after another, not a group)."""
    spec = workload.get("spec") or {}
    if workload.get("kind") == "JobSet":
        return sum(int(r.get("replicas") or 1) * int(((r.get("template") or {}).get("spec") or {}).get("parallelism")
                                                      or 1) for r in spec.get("replicatedJobs") or [])
    return int(spec.get("completions") or 1) if spec.get("completionMode") == "Indexed" else 1


def node_index(pod: Mapping[str, Any]) -> int | None:
    """Which node of a multi-node attempt a pod is (0 leads: global rank 0); None when it does not say."""
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    for key in (JOBSET_JOB_INDEX, COMPLETION_INDEX):  # a JobSet's pods are index 0 of their one-pod Job
        if key in annotations:
            try:
                return int(annotations[key])
            except (TypeError, ValueError):
                return None
    return None


def _finished(workload: Mapping[str, Any]) -> bool:
    if workload.get("kind") == "JobSet":
        return _job_condition(workload, "Completed") is not None
    return bool(_job_condition(workload, "Complete") or _job_condition(workload, "SuccessCriteriaMet"))


def _port(pod: Mapping[str, Any], default_port: int) -> int:
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    try:
        return int(annotations.get(wire.PROMETHEUS_PORT, default_port))
    except ValueError:
        return default_port


def _first_failure(pods: Iterable[Mapping[str, Any]]) -> tuple[Mapping[str, Any], Mapping[str, Any]] | None:
    """(pod, terminated state) of the rank that failed for a reason: a named cause first (a peer then fails only
    because it lost this one), else the earliest to finish."""
    failed = [(p, t) for p in pods if (t := _terminated(p)) and t.get("exitCode")]
    failed.sort(key=lambda pt: (pt[1].get("exitCode") not in CAUSES,
                                pt[1].get("exitCode") == ExitCode.PREEMPTED,  # survivors stopped by the Job controller
                                pt[1].get("finishedAt") or "~",
                                (pt[0].get("metadata") or {}).get("creationTimestamp") or ""))
    return failed[0] if failed else None


def observe(job: Mapping[str, Any] | None, pods: Iterable[Mapping[str, Any]], default_port: int) -> Outcome:
    """What one attempt's workload (a Job or JobSet) and its pods say: still waiting, running, or finished (and
    how). A multi-node attempt succeeds when its workload completes (every pod; the adapter comes from the pod of
    node 0) and fails when it fails (any rank)."""
    if job is None:
        return Outcome(ObservedState.WAITING, "the trainer Job is not there yet")
    size = gang_size(job)
    gang = size > 1
    ordered = sorted(pods, key=lambda p: (p.get("metadata") or {}).get("creationTimestamp") or "")
    exited = _out_of_memory(ordered, gang) or _exited(ordered, gang)
    if exited is not None:
        return exited
    if _finished(job):
        leaders = [p for p in ordered if node_index(p) in (0, None)] if gang else ordered
        done = next((t for p in reversed(leaders) if (t := _terminated(p)) and t.get("exitCode") == 0), None)
        if done is None and any(_live(p) for p in leaders):
            # The Job's watch stream ran ahead of the pods': the adapter's URI and the final loss are in the
            # termination message of the pod that wrote them, so wait for it rather than finish without them.
            return Outcome(ObservedState.SETTLING, "the trainer Job completed; reading its pod's termination message",
                           gang=gang)
        summary = termination_summary(done.get("message") if done else None)
        what = f"all {size} pods finished" if gang else "the trainer Job completed"
        return Outcome(ObservedState.SUCCEEDED, what, summary, gang=gang)
    failed = _job_condition(job, "Failed")
    if failed:
        return _failed(failed, ordered, gang)
    if (job.get("spec") or {}).get("suspend"):
        return Outcome(ObservedState.SUSPENDED, "the trainer Job is suspended")
    if gang:
        return _gang_started(ordered, size, default_port)
    for pod in (p for p in reversed(ordered) if (p.get("status") or {}).get("phase") == "Running"):
        return Outcome(ObservedState.RUNNING, f"training on {(pod.get('spec') or {}).get('nodeName') or 'a node'}",
                       pod_ip=(pod.get("status") or {}).get("podIP"), port=_port(pod, default_port))
    return Outcome(ObservedState.WAITING, "the trainer pod is waiting to be scheduled")


def _out_of_memory(ordered: list[Mapping[str, Any]], gang: bool) -> Outcome | None:
    """Out of memory on any pod ends the attempt: the same class cannot hold it."""
    for pod in ordered:
        term = _terminated(pod)
        if term and (term.get("exitCode") == ExitCode.OOM or term.get("reason") == "OOMKilled"):
            summary = termination_summary(term.get("message"))
            what = "the trainer ran out of GPU memory" if term.get("exitCode") == ExitCode.OOM else \
                "the trainer pod was OOMKilled (host memory)"
            return Outcome(ObservedState.OUT_OF_MEMORY, _error_text(summary, what), summary, gang=gang,
                           exit_code=term.get("exitCode"))
    return None


def _exited(ordered: list[Mapping[str, Any]], gang: bool) -> Outcome | None:
    """A pod's exit code that decides before the workload says so: a lone trainer's 0, or one that fails the
    attempt at once (FAILED_AT_ONCE)."""
    for pod in reversed(ordered):
        term = _terminated(pod)
        if term and term.get("exitCode") == 0 and not gang:
            return Outcome(ObservedState.SUCCEEDED, "the trainer finished", termination_summary(term.get("message")))
        if term and term.get("exitCode") in (ExitCode.BAD_INPUT, ExitCode.NO_GPU):
            at_once = ExitCode(term["exitCode"])
            summary = termination_summary(term.get("message"))
            return Outcome(ObservedState.FAILED, _error_text(summary, FAILED_AT_ONCE[at_once]), summary, gang=gang,
                           exit_code=at_once)
    return None


def _failed(failed: Mapping[str, Any], ordered: list[Mapping[str, Any]], gang: bool) -> Outcome:
    """The workload's Failed condition: why, from the pod that failed (for a gang, which rank and its last
    words), once that pod's exit code is in."""
    first = _first_failure(ordered) if gang else None
    if (first is None or not gang) and any(_live(p) for p in ordered):
        # The Job's watch stream ran ahead of the pods': wait for the exit code of the pod that failed.
        return Outcome(ObservedState.SETTLING, "the trainer Job failed; reading its pod's exit code", gang=gang)
    last = first[1] if first else next((t for p in reversed(ordered) if (t := _terminated(p))), None)
    summary = termination_summary(last.get("message") if last else None)
    code = last.get("exitCode") if last else None
    default = f"the trainer Job failed: {failed.get('reason', '')} {failed.get('message', '')}".strip()
    if code == ExitCode.STORAGE:
        default = "the trainer could not read or write storage (exit code 4)"
    if first:  # which rank failed, then its own words (a log tail: its last line)
        index = node_index(first[0])
        lines = [line for line in (summary.error or "").splitlines() if line.strip()]
        return Outcome(ObservedState.FAILED, f"node {index if index is not None else '?'} (pod "
                                             f"{first[0]['metadata'].get('name')}) exited {code}"
                                             + (f": {lines[-1].strip()}" if lines else ""), summary, gang=True,
                       exit_code=code)
    return Outcome(ObservedState.FAILED, _error_text(summary, default), summary, gang=gang, exit_code=code)


def _gang_started(ordered: list[Mapping[str, Any]], size: int, default_port: int) -> Outcome:
    """A multi-node attempt runs when every node's pod runs (or has finished); progress comes from node 0."""
    running = [p for p in reversed(ordered) if (p.get("status") or {}).get("phase") == "Running"]
    started = [p for p in ordered if (p.get("status") or {}).get("phase") in ("Running", "Succeeded")
               and not (p.get("metadata") or {}).get("deletionTimestamp")]
    nodes_up = {node_index(p) for p in started}
    if len(nodes_up) < size:
        return Outcome(ObservedState.WAITING, f"{len(nodes_up)} of {size} pods running; the ranks wait for each "
                                              "other in the rendezvous", gang=True)
    hosts = ", ".join(sorted({str((p.get("spec") or {}).get("nodeName") or "?") for p in started}))
    leader = next((p for p in running if node_index(p) == 0), running[0] if running else None)
    if leader is None:  # every rank has exited 0; the workload's completion is on its way
        return Outcome(ObservedState.RUNNING, f"trained on {size} nodes ({hosts}); finishing", gang=True)
    return Outcome(ObservedState.RUNNING, f"training on {size} nodes ({hosts})",
                   pod_ip=(leader.get("status") or {}).get("podIP"), port=_port(leader, default_port), gang=True)
