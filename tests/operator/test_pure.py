"""The operator's pure core: placement, manifests, status transitions, outcome reading. No cluster."""

from __future__ import annotations

import json
from typing import Any

import kubernetes_validate
import pytest
from kubetune_operator import resources
from kubetune_operator import status as st
from kubetune_operator.settings import Settings
from kubetune_operator.shape import shape_of

from kubetune.contracts import (
    CONDITION_REASONS,
    ConditionType,
    ExitCode,
    Outcome,
    Phase,
    Reason,
    TerminationSummary,
    TrainerPhase,
    TrainerStatus,
)
from kubetune.planning.gpus import load_catalog
from kubetune.planning.models import resolve_architecture
from kubetune.planning.placement import Inventory, NodeInfo, inventory_of, place
from kubetune.planning.plan import make_plan
from kubetune.spec import FineTuneJobStatus, parse_spec

CATALOG = load_catalog()
K8S = "1.31.0"


def spec(**extra: object):  # type: ignore[no-untyped-def]
    body = {"model": {"name": "meta-llama/Llama-3.1-8B-Instruct"},
            "dataset": {"source": "s3://datasets/train.jsonl"},
            "output": {"uri": "s3://adapters/x/", "credentialsSecret": "s3-creds"}, **extra}
    return parse_spec(body)


def plan_for(s):  # type: ignore[no-untyped-def]
    return make_plan(s, resolve_architecture(s.model.name, s.model.source), CATALOG)


# --- placement --------------------------------------------------------------------------------------

L4 = {"nvidia.com/gpu.product": "NVIDIA-L4"}
H100_AKS = {"node.kubernetes.io/instance-type": "Standard_ND96isr_H100_v5"}


@pytest.mark.parametrize(
    ("nodes", "in_use", "gpu_class", "count", "kind", "fragment"),
    [
        ([NodeInfo("a", L4, 1)], {}, "L4", 1, "Placed", "free now on 1 node"),
        ([NodeInfo("a", L4, 1)], {"a": 1}, "L4", 1, "Busy", "are busy"),
        ([NodeInfo("a", L4, 1)], {}, "L4", 2, "NoNodes", "at most 1 allocatable"),
        ([NodeInfo("a", L4, 1)], {}, "A100-80GB", 1, "NoNodes", "no schedulable A100-80GB node"),
        ([NodeInfo("a", L4, 1, schedulable=False)], {}, "L4", 1, "NoNodes", "no schedulable L4"),
        ([NodeInfo("h", H100_AKS, 8)], {"h": 4}, "H100-80GB", 4, "Placed", "4x H100-80GB free"),
        ([NodeInfo("h", H100_AKS, 8)], {"h": 5}, "H100-80GB", 4, "Busy", "busy"),
    ],
)
def test_place(nodes: list[NodeInfo], in_use: dict[str, int], gpu_class: str, count: int, kind: str,
               fragment: str) -> None:
    result = place(gpu_class, count, Inventory(tuple(nodes), in_use), CATALOG)
    assert result.kind == kind
    assert fragment in result.message


def test_no_nodes_message_names_the_class_its_labels_and_the_cluster() -> None:
    inventory = Inventory((NodeInfo("a", L4, 2), NodeInfo("b", H100_AKS, 8), NodeInfo("c", {}, 0)), {"b": 3})
    message = place("A10G", 1, inventory, CATALOG).message
    assert "A10G" in message and "nvidia.com/gpu.product=NVIDIA-A10G" in message
    assert "1x L4 (2/2 GPUs free)" in message and "1x H100-80GB (5/8 GPUs free)" in message
    assert "1 node without a known GPU class" in message


def test_inventory_counts_gpus_of_live_pods_only() -> None:
    nodes = [{"metadata": {"name": "a", "labels": L4}, "status": {"allocatable": {"nvidia.com/gpu": "4"}}}]
    pod = {"spec": {"nodeName": "a", "containers": [{"resources": {"limits": {"nvidia.com/gpu": "2"}}}]},
           "status": {"phase": "Running"}}
    done = {**pod, "status": {"phase": "Succeeded"}}
    inventory = inventory_of(nodes, [pod, done])
    assert inventory.gpus_in_use == {"a": 2}
    assert inventory.free_gpus(inventory.nodes[0]) == 2


# --- manifests --------------------------------------------------------------------------------------

OWNER = resources.Owner("support-bot", "ml", "0b8f6f3e-1111-2222-3333-444455556666", {})


def test_job_and_configmap_are_valid_kubernetes_objects_with_the_pod_hardening() -> None:
    s = spec(queue="team-a")
    plan = plan_for(s)
    gpu = CATALOG.get(plan.gpu_class, "x")
    settings = Settings(default_s3_endpoint="http://minio.storage:9000")
    job = resources.trainer_job(OWNER, s, plan, gpu, 2, settings, shape_of(plan.strategy, plan.gpu_count, gpu))
    config = resources.config_map(OWNER, s, plan, 2, settings)
    kubernetes_validate.validate(job, K8S, strict=True)
    kubernetes_validate.validate(config, K8S, strict=True)

    assert job["metadata"]["name"] == "support-bot-a2" and config["metadata"]["name"] == "support-bot-a2"
    assert job["metadata"]["ownerReferences"] == [OWNER.reference()]
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert job["spec"]["suspend"] is True  # Kueue admits it
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    requests = dict(container["resources"]["requests"])
    assert requests.pop("ephemeral-storage").endswith("Gi")  # sized by the plan (tests/operator/test_pod_budget.py)
    assert container["resources"]["limits"] == requests
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["terminationMessagePath"] == "/dev/termination-log"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}} in pod["volumes"]
    annotations = job["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "8000"
    env = {e["name"]: e for e in container["env"]}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {
        "name": "s3-creds", "key": "AWS_ACCESS_KEY_ID", "optional": False}
    assert "value" not in env["AWS_SECRET_ACCESS_KEY"]
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio.storage:9000"
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0]["action"] == "FailJob" and 3 in rules[0]["onExitCodes"]["values"]
    assert rules[1] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert rules[2] == {"action": "Ignore", "onExitCodes": {"containerName": "trainer", "operator": "In",
                                                            "values": [143]}}
    assert pod["restartPolicy"] == "Never"

    trainer = json.loads(config["data"]["job.json"])
    assert trainer["attempt"] == 2 and trainer["gpuClass"] == plan.gpu_class
    assert "s3-creds" in config["data"]["job.json"]  # the secret's name only
    assert json.loads(config["data"]["plan.json"])["gpuClass"] == plan.gpu_class


def test_affinity_admits_every_provider_label_set_of_the_class() -> None:
    gpu = CATALOG.get("A100-80GB", "x")
    terms = resources.node_affinity(gpu)["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"]
    assert len(terms) == len(gpu.node_labels) >= 4
    keys = {e["key"] for t in terms for e in t["matchExpressions"]}
    assert {"nvidia.com/gpu.product", "karpenter.k8s.aws/instance-gpu-name", "cloud.google.com/gke-accelerator",
            "node.kubernetes.io/instance-type"} <= keys


def test_multi_gpu_resources_scale_and_names_stay_dns_labels() -> None:
    s = spec(model={"name": "meta-llama/Llama-3.1-70B"}, method="lora")
    plan = plan_for(s)
    assert plan.gpu_count > 1
    gpu = CATALOG.get(plan.gpu_class, "x")
    job = resources.trainer_job(resources.Owner("x" * 70, "ml", "u", {}), s, plan, gpu, 12, Settings(),
                                shape_of(plan.strategy, plan.gpu_count, gpu))
    limits = job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == str(plan.gpu_count)
    budget = resources.plan_budget(s, plan, Settings())
    assert resources.quantity_bytes(limits["memory"]) == max(12 * 2**30 * plan.gpu_count, budget.host_memory_bytes)
    if plan.strategy == "fsdp":  # 16-bit 70B: each of the 8 ranks loads a 141 GB copy into host memory
        assert limits["memory"] == resources.quantity(budget.host_memory_bytes)
    assert len(job["metadata"]["name"]) <= 63 and job["metadata"]["name"].endswith("-a12")


# --- status -----------------------------------------------------------------------------------------

def test_transition_patches_only_changes_and_keeps_transition_times() -> None:
    patch, event = st.transition({}, phase="Queued", reason="JobCreated", message="m", generation=1, now="T1")
    assert patch["phase"] == "Queued" and event == st.Event("Normal", "JobCreated", "Queued: m")
    current = dict(patch)
    again, event = st.transition(current, phase="Queued", reason="JobCreated", message="m", generation=1, now="T2")
    assert again == {} and event is None  # replayed: nothing to write, no duplicate Event

    running, event = st.transition(current, phase="Running", reason="Training", message="m2", generation=1,
                                   now="T3")
    assert event is not None and event.reason == "Training"
    times = {c["type"]: c["lastTransitionTime"] for c in running["conditions"]}
    assert times == {"Ready": "T1", "Reconciling": "T1", "Stalled": "T1"}  # statuses did not flip

    done, _ = st.transition({**current, **running}, phase="Succeeded", reason="Succeeded", message="ok",
                            generation=1, now="T4")
    conds = {c["type"]: (c["status"], c["lastTransitionTime"]) for c in done["conditions"]}
    assert conds == {"Ready": ("True", "T4"), "Reconciling": ("False", "T4"), "Stalled": ("False", "T1")}


def test_failed_is_stalled_and_a_warning() -> None:
    patch, event = st.transition({}, phase="Failed", reason="InvalidSpec", message="spec.lora.r: bad", generation=3)
    conds = {c["type"]: c for c in patch["conditions"]}
    assert conds["Stalled"]["status"] == "True" and conds["Stalled"]["observedGeneration"] == 3
    assert event is not None and event.type == "Warning"


def _pod(code: int | None = None, reason: str = "", phase: str = "Running", message: str = "") -> dict:
    state = {"terminated": {"exitCode": code, "reason": reason, "message": message}} if code is not None else \
        {"running": {}}
    return {"metadata": {"creationTimestamp": "2026-11-30T08:00:00Z", "annotations": {"prometheus.io/port": "9"}},
            "spec": {"nodeName": "n"},
            "status": {"phase": phase, "podIP": "10.0.0.5", "containerStatuses": [{"name": "trainer", "state": state}]}}


@pytest.mark.parametrize(
    ("job", "pods", "state"),
    [
        (None, [], "Waiting"),
        ({"spec": {}}, [], "Waiting"),
        ({"spec": {"suspend": True}}, [], "Suspended"),
        ({"spec": {}}, [_pod()], "Running"),
        ({"spec": {}}, [_pod(3, "Error", "Failed")], "OutOfMemory"),
        ({"spec": {}}, [_pod(137, "OOMKilled", "Failed")], "OutOfMemory"),
        ({"spec": {}}, [_pod(0, "Completed", "Succeeded")], "Succeeded"),
        ({"spec": {}}, [_pod(2, "Error", "Failed")], "Failed"),
        ({"spec": {}}, [_pod(1, "Error", "Failed")], "Waiting"),  # the Job retries within its backoffLimit
        ({"spec": {}, "status": {"conditions": [{"type": "Failed", "status": "True",
                                                 "reason": "BackoffLimitExceeded"}]}},
         [_pod(4, "Error", "Failed", '{"error": "s3: access denied"}')], "Failed"),
        ({"spec": {}, "status": {"conditions": [{"type": "Complete", "status": "True"}]}}, [], "Succeeded"),
        ({"spec": {}, "status": {"conditions": [{"type": "Complete", "status": "True"}]}}, [_pod()], "Settling"),
        ({"spec": {}, "status": {"conditions": [{"type": "Failed", "status": "True"}]}}, [_pod()], "Settling"),
    ],
)
def test_observe(job: dict | None, pods: list[dict], state: str) -> None:
    outcome = st.observe(job, pods, 8000)
    assert outcome.state == state
    if state == "Running":
        assert (outcome.pod_ip, outcome.port) == ("10.0.0.5", 9)
    if job and job.get("status") and state == "Failed":
        assert outcome.message == "s3: access denied"


def test_the_operator_reads_the_document_the_trainer_serves() -> None:
    served = TrainerStatus(phase=TrainerPhase.TRAINING, step=3, total_steps=10, loss=1.5, tokens_per_second=9,
                           peak_memory_bytes=2**30).document()
    assert served["totalSteps"] == 10 and served["tokensPerSecond"] == 9  # camelCase on the wire
    parsed = TrainerStatus.parse(json.loads(json.dumps(served)))
    assert parsed is not None
    progress = st.trainer_progress(parsed, "T")
    assert progress == {"step": 3, "totalSteps": 10, "loss": 1.5, "tokensPerSecond": 9.0, "etaSeconds": None,
                        "peakMemoryBytes": 2**30, "updatedAt": "T", "percent": 30}
    assert st.progress_fields(progress) == {"progress": progress, "step": "3/10", "loss": "1.500"}


@pytest.mark.parametrize("body", [[1, 2], {"step": "many"}, {"phase": "Dancing"}, "text"])
def test_a_status_document_that_breaks_the_contract_is_refused(body: object) -> None:
    assert TrainerStatus.parse(body) is None


def test_termination_summary_round_trip_and_the_4096_byte_limit() -> None:
    summary = TerminationSummary(outcome=Outcome.OUT_OF_MEMORY, exit_code=ExitCode.OOM, steps=4, error="x" * 9000)
    message = summary.message()
    assert len(message.encode()) <= 4096
    parsed = TerminationSummary.parse(message)
    assert parsed is not None and parsed.outcome is Outcome.OUT_OF_MEMORY and parsed.steps == 4
    assert TerminationSummary.parse("Traceback (most recent call last): boom") == TerminationSummary(
        error="Traceback (most recent call last): boom")
    assert TerminationSummary.parse("") is None


def test_conditions_carry_a_reason_each_from_the_one_enum() -> None:
    for phase in Phase:
        for reason in Reason:
            if reason in CONDITION_REASONS[ConditionType.READY]:
                patch, _ = st.transition({}, phase=phase, reason=reason, message="m", generation=1, now="T")
                for cond in patch["conditions"]:
                    ctype = ConditionType(cond["type"])
                    if cond["status"] == "True" or ctype is ConditionType.READY:
                        continue
                    assert Reason(cond["reason"]) in CONDITION_REASONS[ctype], (phase, reason, cond)
    queued, _ = st.transition({}, phase=Phase.QUEUED, reason=Reason.JOB_CREATED, message="m", generation=1)
    assert {c["type"]: c["reason"] for c in queued["conditions"]} == {
        "Ready": "JobCreated", "Reconciling": "JobCreated", "Stalled": "NotStalled"}
    failed, _ = st.transition({}, phase=Phase.FAILED, reason=Reason.INVALID_SPEC, message="m", generation=1)
    assert {c["type"]: c["reason"] for c in failed["conditions"]} == {
        "Ready": "InvalidSpec", "Reconciling": "NotReconciling", "Stalled": "InvalidSpec"}


def test_exit_codes_in_the_pod_failure_policy_are_the_trainers() -> None:
    s = spec()
    plan = plan_for(s)
    gpu = CATALOG.get(plan.gpu_class, "x")
    job = resources.trainer_job(OWNER, s, plan, gpu, 1, Settings(), shape_of(plan.strategy, plan.gpu_count, gpu))
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0]["onExitCodes"]["values"] == [ExitCode.BAD_INPUT, ExitCode.OOM, ExitCode.NO_GPU]
    assert rules[2]["onExitCodes"]["values"] == [ExitCode.PREEMPTED]


@pytest.mark.parametrize(("args", "text"), [
    (("L4", 1), "L4 x1"),
    (("L4", 4, "fsdp"), "L4 x4 FSDP"),
    (("A10G", 2, "ddp", 2), "A10G x2 DDP, 2 nodes"),
    (("A100-40GB", 2, "pipeline"), "A100-40GB x2 split"),
    (("L4", 1, "single"), "L4 x1"),
])
def test_the_gpu_column_says_how_several_gpus_train(args: tuple[Any, ...], text: str) -> None:
    assert st.gpu_text(*args) == text


def test_the_plan_in_status_carries_its_strategy_and_nodes() -> None:
    s = spec(model={"name": "meta-llama/Llama-3.1-70B-Instruct"})
    fields = st.plan_fields(plan_for(s))
    assert fields["gpu"] == "L4 x4 FSDP"
    assert (fields["plan"]["strategy"], fields["plan"]["nodes"]) == ("fsdp", 1)
    FineTuneJobStatus.model_validate({"plan": fields["plan"]})  # the status model (and so the CRD) accepts it


def test_the_command_lines_options_override_the_environment() -> None:
    from kubetune_operator.main import OperatorOptions, operator_settings

    base = Settings(namespaces=("ml",), peering="kubetune", metrics_port=9000)
    assert operator_settings(OperatorOptions(), base) == base  # no flag: the environment's settings
    given = operator_settings(OperatorOptions(namespaces=("a", "b"), peering="other", metrics_port=0), base)
    assert (given.namespaces, given.peering, given.metrics_port) == (("a", "b"), "other", 0)
