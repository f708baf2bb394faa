"""`reconcile(snapshot) -> Actions`, the operator's one decision, as tables: every phase transition without a
cluster (the same decisions run end to end against the emulator in test_operator_flow.py)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from kubetune_operator import status as st
from kubetune_operator.reconcile import Actions, Snapshot, next_attempt, oom_floor, reconcile, with_attempt
from kubetune_operator.settings import Settings
from pydantic import ValidationError

from kubetune.contracts import Outcome, Phase, Reason, TerminationSummary, TrainerPhase, TrainerStatus
from kubetune.errors import HubUnreachable
from kubetune.planning.gpus import load_catalog
from kubetune.planning.placement import Inventory, NodeInfo, supply_of
from kubetune.planning.plan import Plan, make_plan
from kubetune.sources import model_architecture
from kubetune.spec import FineTuneJobSpec
from kubetune.wire import AttemptOutcome

CATALOG = load_catalog(provisionable=())
L4 = NodeInfo("l4-1", {"nvidia.com/gpu.product": "NVIDIA-L4"}, 1)
A10G = NodeInfo("a10g-1", {"nvidia.com/gpu.product": "NVIDIA-A10G"}, 1)
A100_40 = NodeInfo("a100-40-1", {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB"}, 4)
A100_80 = NodeInfo("a100-80-1", {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}, 8)
CLUSTER = Inventory((L4, A10G, A100_80))
NOW = "2026-12-02T08:00:00Z"


def body(generation: int = 1, labels: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"model": {"name": "meta-llama/Llama-3.1-8B-Instruct"},
                            "dataset": {"source": "s3://datasets/train.jsonl"},
                            "output": {"uri": "s3://adapters/j/"}}
    for key, value in spec.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": "j", "namespace": "ml", "uid": "u-1", "generation": generation,
                         "labels": labels or {}},
            "spec": base}


def snapshot(ftj: dict[str, Any], status: dict[str, Any] | None = None, *, job: dict[str, Any] | None = None,
             pods: tuple[dict[str, Any], ...] = (), inventory: Inventory = CLUSTER, catalog: Any = CATALOG,
             settings: Settings | None = None, **extra: Any) -> Snapshot:
    supply = supply_of(inventory, catalog)

    def planner(spec: FineTuneJobSpec, above: str | None) -> Plan:
        return make_plan(spec, model_architecture(spec.model.name, spec.model.source), catalog, above=above,
                         supply=supply)

    settings = settings or Settings()
    return Snapshot(body=ftj, status=status or {}, trainer_job=job, pods=pods,
                    outcome=st.observe(job, pods, settings.trainer_port), inventory=inventory, catalog=catalog,
                    settings=settings, planner=planner, now=NOW, **extra)


def after(snap: Snapshot, actions: Actions) -> dict[str, Any]:
    """The status once the patch is applied (None deletes)."""
    result = dict(snap.status)
    for key, value in actions.status.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = value
    return result


def settle(snap: Snapshot) -> dict[str, Any]:
    """Reconcile once and return the status written (what the next snapshot starts from)."""
    return after(snap, reconcile(snap))


def pod(code: int | None = None, reason: str = "", message: str = "", phase: str = "Running") -> dict[str, Any]:
    state = {"terminated": {"exitCode": code, "reason": reason, "message": message}} if code is not None else \
        {"running": {}}
    return {"metadata": {"name": "j-a1-x", "creationTimestamp": "2026-12-02T08:01:00Z",
                         "annotations": {"prometheus.io/port": "8000"}},
            "spec": {"nodeName": "l4-1"},
            "status": {"phase": phase if code is None else ("Succeeded" if code == 0 else "Failed"),
                       "podIP": "10.0.0.9", "containerStatuses": [{"name": "trainer", "state": state}]}}


def trainer_job(suspend: bool = False, condition: str | None = None) -> dict[str, Any]:
    conditions = [{"type": condition, "status": "True", "reason": condition}] if condition else []
    return {"metadata": {"name": "j-a1"}, "spec": {"suspend": suspend}, "status": {"conditions": conditions}}


OOM = TerminationSummary(outcome=Outcome.OUT_OF_MEMORY, exit_code=3, steps=37, error="CUDA out of memory").message()
DONE = TerminationSummary(outcome=Outcome.SUCCEEDED, exit_code=0, steps=500, total_steps=500, final_loss=0.81,
                          adapter_uri="s3://adapters/j/adapter/").message()
BAD = TerminationSummary(outcome=Outcome.INVALID_INPUT, exit_code=2, error="dataset line 3: not JSON").message()

QUEUED = settle(snapshot(body()))  # the status after the first launch: Queued on L4, attempt 1
RUNNING = settle(snapshot(body(), QUEUED, job=trainer_job(), pods=(pod(),)))
SUCCEEDED = settle(snapshot(body(), RUNNING, job=trainer_job(), pods=(pod(0, message=DONE),)))
SUSPENDED = settle(snapshot(body(2, suspend=True), RUNNING, job=trainer_job(), pods=(pod(),)))


def test_the_fixtures_are_what_the_tables_start_from() -> None:
    assert (QUEUED["phase"], QUEUED["jobName"], QUEUED["gpu"]) == ("Queued", "j-a1", "L4 x1")
    assert RUNNING["phase"] == "Running" and RUNNING["attempts"][0]["outcome"] == "Running"
    assert (SUCCEEDED["phase"], SUSPENDED["phase"], SUSPENDED["observedGeneration"]) == ("Succeeded", "Suspended", 2)


# (case, snapshot, phase after, reason of the Event (None: no Event), kinds created, suspend_job)
CASES: list[tuple[str, Snapshot, str, str | None, list[str], tuple[str, bool] | None]] = [
    ("new job, a node of the class is free", snapshot(body()), "Queued", "JobCreated", ["ConfigMap", "Job"], None),
    ("invalid spec", snapshot(body(lora={"r": -4})), "Failed", "InvalidSpec", [], None),
    ("no class holds it within maxGpuClass", snapshot(body(model={"name": "meta-llama/Llama-3.1-405B-Instruct"},
                                                           method="lora", resources={"maxGpuClass": "L4"})),
     "Failed", "Unplannable", [], None),
    ("pinned to a class without nodes: no capacity", snapshot(body(resources={"gpuClass": "A100-40GB"})),
     "Pending", "NoMatchingNodes", [], None),
    ("still no capacity: nothing new", snapshot(body(resources={"gpuClass": "A100-40GB"}),
                                                settle(snapshot(body(resources={"gpuClass": "A100-40GB"})))),
     "Pending", None, [], None),
    ("no capacity, then capacity appears", snapshot(
        body(resources={"gpuClass": "A100-40GB"}), settle(snapshot(body(resources={"gpuClass": "A100-40GB"}))),
        inventory=Inventory((*CLUSTER.nodes, A100_40))), "Queued", "JobCreated", ["ConfigMap", "Job"], None),
    ("a provisionable class without nodes gets its Job", snapshot(
        body(resources={"gpuClass": "A100-40GB"}), catalog=load_catalog(provisionable=("A100-40GB",))),
     "Queued", "JobCreated", ["ConfigMap", "Job"], None),
    ("Kueue queue", snapshot(body(queue="team-a")), "Queued", "WaitingForKueue", ["ConfigMap", "Job"], None),
    ("suspended from the start", snapshot(body(suspend=True)), "Suspended", "Suspended", ["ConfigMap", "Job"],
     None),
    ("a child name taken by a foreign object", snapshot(body(), child_conflict="Job ml/j-a1 exists and is not "
                                                                             "owned by this FineTuneJob"),
     "Failed", "ChildNameTaken", [], None),
    ("Queued, the Job has no pod yet", snapshot(body(), QUEUED, job=trainer_job()), "Queued", None, [], None),
    ("Queued, the pod runs", snapshot(body(), QUEUED, job=trainer_job(), pods=(pod(),)), "Running", "Training", [],
     None),
    ("Running, /status polled", snapshot(body(), RUNNING, job=trainer_job(), pods=(pod(),),
                                         trainer_status=TrainerStatus(phase=TrainerPhase.TRAINING, step=120,
                                                                      total_steps=500, loss=1.2345)),
     "Running", None, [], None),
    ("Running, the trainer exits 0", snapshot(body(), RUNNING, job=trainer_job(), pods=(pod(0, message=DONE),)),
     "Succeeded", "Succeeded", [], None),
    ("Running, out of GPU memory: escalation", snapshot(body(), RUNNING, job=trainer_job("Failed"),
                                                       pods=(pod(3, message=OOM),)),
     "Queued", "OutOfMemoryEscalated", ["ConfigMap", "Job"], None),
    ("Running, OOMKilled on a pinned class", snapshot(body(resources={"gpuClass": "L4"}), RUNNING,
                                                      job=trainer_job(), pods=(pod(137, "OOMKilled"),)),
     "Failed", "NoLargerGpuClass", [], None),
    ("Running, OOM and the next class has no node", snapshot(
        body(resources={"maxGpuClass": "A100-40GB"}), RUNNING, job=trainer_job(), pods=(pod(3, message=OOM),)),
     "Pending", "NoMatchingNodes", [], None),
    ("Running, bad input (exit 2)", snapshot(body(), RUNNING, job=trainer_job(), pods=(pod(2, message=BAD),)),
     "Failed", "TrainingFailed", [], None),
    ("Running, the Job failed without a pod", snapshot(body(), RUNNING, job=trainer_job(condition="Failed")),
     "Failed", "TrainingFailed", [], None),
    ("Running, the queue suspends the Job: preemption", snapshot(body(), RUNNING, job=trainer_job(suspend=True)),
     "Queued", "Preempted", [], None),
    ("Running, the pod went away", snapshot(body(), RUNNING, job=trainer_job()), "Queued", "Rescheduling", [], None),
    ("spec.suspend set while running", snapshot(body(2, suspend=True), RUNNING, job=trainer_job(), pods=(pod(),)),
     "Suspended", "Suspended", [], ("j-a1", True)),
    ("spec.suspend cleared: resume", snapshot(body(3), SUSPENDED, job=trainer_job(suspend=True)),
     "Queued", "Resumed", [], ("j-a1", False)),
    ("resume of a Kueue job is left to Kueue", snapshot(body(3, queue="team-a"), SUSPENDED,
                                                        job=trainer_job(suspend=True)),
     "Queued", "Resumed", [], None),
    ("another spec change while running: deferred", snapshot(body(2, lora={"r": 8}), RUNNING, job=trainer_job(),
                                                             pods=(pod(),)),
     "Running", "SpecChangeDeferred", [], None),
    ("spec changed after success: ignored", snapshot(body(2), SUCCEEDED), "Succeeded",
     "SpecChangeIgnored", [], None),
    ("spec fixed after failure: relaunch", snapshot(body(2), settle(snapshot(body(lora={"r": -4})))), "Queued",
     "JobCreated", ["ConfigMap", "Job"], None),
    ("Succeeded is terminal", snapshot(body(), SUCCEEDED, job=trainer_job()), "Succeeded",
     None, [], None),
]


@pytest.mark.parametrize(("case", "snap", "phase", "reason", "kinds", "suspend"), CASES, ids=[c[0] for c in CASES])
def test_reconcile(case: str, snap: Snapshot, phase: str, reason: str | None, kinds: list[str],
                   suspend: tuple[str, bool] | None) -> None:
    actions = reconcile(snap)
    status = after(snap, actions)
    assert status["phase"] == phase
    assert [e.reason for e in actions.events] == ([Reason(reason)] if reason else [])
    assert [c["kind"] for c in actions.create] == kinds
    assert actions.suspend_job == suspend
    if actions.events and Phase(phase) is Phase.FAILED:
        assert actions.events[0].type == "Warning"
    # Idempotent: the snapshot with the status it produced (and the new attempt's Job, which does not exist
    # yet, when one was launched) decides no new Event or child, and converges on the second replay.
    same_job = status.get("jobName") == snap.status.get("jobName")
    replay = replace(snap, status=status, trainer_job=snap.trainer_job if same_job else None,
                     pods=snap.pods if same_job else (),
                     outcome=snap.outcome if same_job else st.observe(None, (), snap.settings.trainer_port))
    again = reconcile(replay)
    assert not again.events and not again.create, (case, again)
    assert reconcile(replace(replay, status=after(replay, again))).empty, case


def test_oom_escalation_records_the_attempt_and_the_next_class() -> None:
    snap = snapshot(body(), RUNNING, job=trainer_job("Failed"), pods=(pod(3, message=OOM),))
    actions = reconcile(snap)
    status = after(snap, actions)
    assert [(a["attempt"], a["gpuClass"], a["outcome"]) for a in status["attempts"]] == [
        (1, "L4", "OutOfMemory"), (2, "A100-80GB", "Pending")]
    assert status["jobName"] == "j-a2" and "CUDA out of memory" in status["attempts"][0]["message"]
    assert ("oom_escalations", ("L4", "A100-80GB")) in actions.counters
    assert actions.create[1]["metadata"]["name"] == "j-a2"


def test_oom_with_no_node_of_the_next_class_ends_the_attempt_and_waits() -> None:
    snap = snapshot(body(resources={"maxGpuClass": "A100-40GB"}), RUNNING, job=trainer_job(),
                    pods=(pod(3, message=OOM),))
    status = after(snap, reconcile(snap))
    assert "jobName" not in status and status["plan"]["gpuClass"] == "A100-40GB"
    later = snapshot(body(resources={"maxGpuClass": "A100-40GB"}), status, inventory=Inventory((*CLUSTER.nodes,
                                                                                                A100_40)))
    placed = after(later, reconcile(later))
    assert placed["jobName"] == "j-a2" and placed["gpu"] == "A100-40GB x1"


def test_progress_from_status_then_nothing_for_a_trainer_at_rest() -> None:
    polled = TrainerStatus(phase=TrainerPhase.TRAINING, step=120, total_steps=500, loss=1.2345)
    snap = snapshot(body(), RUNNING, job=trainer_job(), pods=(pod(),), trainer_status=polled)
    status = after(snap, reconcile(snap))
    assert (status["step"], status["loss"]) == ("120/500", "1.234")
    rest = reconcile(replace(snap, status=status, now="2026-12-02T08:05:00Z"))
    assert rest.empty


def test_success_takes_the_summary() -> None:
    snap = snapshot(body(), RUNNING, job=trainer_job(), pods=(pod(0, message=DONE),))
    status = after(snap, reconcile(snap))
    assert status["adapterUri"] == "s3://adapters/j/adapter/" and status["step"] == "500/500"
    assert status["conditions"][0] == {"type": "Ready", "status": "True", "reason": "Succeeded",
                                       "message": "adapter written to s3://adapters/j/adapter/",
                                       "lastTransitionTime": NOW, "observedGeneration": 1}


def test_placement_failure_is_counted_once() -> None:
    snap = snapshot(body(resources={"gpuClass": "A100-40GB"}))
    first = reconcile(snap)
    assert first.counters == [("placement_failures", ("A100-40GB",))]
    assert reconcile(replace(snap, status=after(snap, first))).counters == []


def test_attempt_helpers() -> None:
    assert next_attempt([]) == 1
    assert next_attempt([{"attempt": 1, "outcome": "Pending"}]) == 1
    assert next_attempt([{"attempt": 1, "outcome": "OutOfMemory"}]) == 2
    assert oom_floor([{"gpuClass": "L4", "outcome": "OutOfMemory"}, {"gpuClass": "A100-40GB",
                                                                     "outcome": "OutOfMemory"}], CATALOG) == "A100-40GB"
    pending = {"attempt": 1, "gpuClass": "L4", "jobName": "j-a1", "outcome": "Pending"}  # as the CRD requires
    assert with_attempt([pending], 1, AttemptOutcome.RUNNING, message=None) == [{**pending, "outcome": "Running"}]
    assert with_attempt([pending], 2, AttemptOutcome.PENDING, gpu_class="A100-80GB", job_name="j-a2",
                        started_at=NOW) == [pending, {"attempt": 2, "gpuClass": "A100-80GB", "jobName": "j-a2",
                                                      "outcome": "Pending", "startedAt": NOW}]
    with pytest.raises(ValidationError, match="gpuClass"):  # a new entry says where it runs
        with_attempt([], 1, AttemptOutcome.PENDING, job_name="j-a1")
    assert st.trainer_progress(TrainerStatus(step=1), NOW)["totalSteps"] is None


def test_the_step_an_attempt_resumed_from_is_recorded() -> None:
    polled = TrainerStatus(phase=TrainerPhase.TRAINING, step=60, total_steps=500, resumed_from_step=50)
    snap = snapshot(body(), RUNNING, job=trainer_job(), pods=(pod(),), trainer_status=polled)
    assert after(snap, reconcile(snap))["attempts"][0]["resumedFromStep"] == 50
    done = TerminationSummary(outcome=Outcome.SUCCEEDED, exit_code=0, steps=500, resumed_from_step=50).message()
    snap = snapshot(body(), RUNNING, job=trainer_job(), pods=(pod(0, message=done),))
    assert after(snap, reconcile(snap))["attempts"][0]["resumedFromStep"] == 50


def test_a_hub_that_does_not_answer_leaves_the_job_pending_and_an_answer_plans_it() -> None:
    """HubUnreachable from the planner is not an invalid spec: Pending (a Warning), no children; the timer's
    next reconcile plans it once the hub answers."""
    def unreachable(spec: FineTuneJobSpec, above: str | None) -> Plan:
        raise HubUnreachable("spec.model.name: https://hub.example answered HTTP 503 for 'acme/x''s config.json")

    snap = replace(snapshot(body()), planner=unreachable)
    actions = reconcile(snap)
    status = after(snap, actions)
    assert (status["phase"], status["conditions"][0]["reason"]) == ("Pending", "ModelConfigUnreachable")
    assert "HTTP 503" in status["message"] and not actions.create and "jobName" not in status
    assert [(e.type, e.reason) for e in actions.events] == [("Warning", "ModelConfigUnreachable")]
    healed = reconcile(snapshot(body(), status))
    assert [c["kind"] for c in healed.create][-1] == "Job" and healed.status["phase"] == "Queued"


def test_success_with_an_evaluation_writes_status_result_and_one_evaluated_event() -> None:
    from kubetune.contracts import EvalAnswer, EvalSummary

    evaluation = EvalSummary(rows=6, tokens=1204, base_loss=2.4131, adapter_loss=1.0522, base_perplexity=11.17,
                             adapter_perplexity=2.864, prompts=4, uri="s3://adapters/j/eval.json",
                             answers=[EvalAnswer(prompt="What warranty do I get?", base="I am not sure.",
                                                 adapter="Pebblewave here! Two years.")])
    done = TerminationSummary(outcome=Outcome.SUCCEEDED, exit_code=0, steps=500, total_steps=500,
                              adapter_uri="s3://adapters/j/adapter/", evaluation=evaluation).message()
    snap = snapshot(body(), RUNNING, job=trainer_job(), pods=(pod(0, message=done),))
    actions = reconcile(snap)
    status = after(snap, actions)
    result = status["result"]
    assert result["summary"] == "held-out loss 2.413 -> 1.052 (perplexity 11.2 -> 2.86) on 6 rows, 1,204 tokens"
    assert (result["baseLoss"], result["adapterLoss"], result["rows"]) == (2.4131, 1.0522, 6)
    assert result["answers"] == [{"prompt": "What warranty do I get?", "base": "I am not sure.",
                                  "adapter": "Pebblewave here! Two years."}]
    assert result["evalUri"] == "s3://adapters/j/eval.json"
    from kubetune.spec import FineTuneJobStatus

    FineTuneJobStatus.model_validate(status)  # status.result has the CRD's shape
    [told] = [e for e in actions.events if e.reason is Reason.EVALUATED]
    assert told.type == "Normal" and told.message.startswith("Evaluated: held-out loss 2.413 -> 1.052")
    assert "'What warranty do I get?' base: 'I am not sure.' adapter: 'Pebblewave here! Two years.'" in told.message
    assert [e.reason for e in actions.events] == [Reason.SUCCEEDED, Reason.EVALUATED]
    again = reconcile(replace(snap, status=status, now="2026-12-02T08:05:00Z"))
    assert not [e for e in again.events if e.reason is Reason.EVALUATED]  # told once
