"""The real kopf operator against kmock's Kubernetes emulator over HTTP: the path of a FineTuneJob."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from kt_cluster import NS, Cluster, eventually, finetunejob
from kubetune_operator.resources import Owner, child_name

from kubetune.contracts import Outcome, TerminationSummary
from kubetune.planning.gpus import load_catalog
from kubetune.spec import FineTuneJobStatus


def affinity_classes(job: dict) -> set[str]:
    """Which catalog classes the Job's required node affinity admits (each term is one label set)."""
    terms = job["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    catalog = load_catalog()
    found = set()
    for term in terms:
        labels = {e["key"]: e["values"][0] for e in term["matchExpressions"]}
        gpu = catalog.class_of_node(labels)
        assert gpu is not None, labels
        found.add(gpu.name)
    return found


@pytest.mark.parametrize(
    ("name", "model", "extra", "gpu"),
    [
        ("llama-8b", "meta-llama/Llama-3.1-8B-Instruct", {}, "L4 x1"),
        ("llama-8b-pinned", "meta-llama/Llama-3.1-8B-Instruct", {"resources": {"gpuClass": "A10G"}}, "A10G x1"),
        ("llama-70b", "meta-llama/Llama-3.1-70B-Instruct", {}, "A100-80GB x1"),
        ("qwen-7b-lora-pinned", "Qwen/Qwen2.5-7B", {"method": "lora", "training": {"maxSeqLength": 8192},
                                             "resources": {"gpuClass": "H100-80GB"}}, "H100-80GB x1"),
    ],
)
async def test_jobs_land_on_the_planned_class(cluster: Cluster, name: str, model: str, extra: dict,
                                              gpu: str) -> None:
    await cluster.start_operator()
    await cluster.apply(finetunejob(name, model, **extra))
    status = await cluster.wait_phase(name, "Queued")

    assert status["gpu"] == gpu
    assert status["vram"].endswith("Gi")
    assert status["plan"]["gpuClass"] == gpu.split()[0]
    assert status["plan"]["knobs"]["microBatchSize"] >= 1
    assert status["jobName"] == f"{name}-a1"
    assert status["observedGeneration"] == 1
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Ready"]["status"] == "False"
    assert conditions["Reconciling"]["status"] == "True"
    assert conditions["Stalled"]["status"] == "False"
    assert conditions["Ready"]["reason"] == "JobCreated"
    assert status["attempts"][0]["gpuClass"] == gpu.split()[0]
    FineTuneJobStatus.model_validate(status)

    [job] = cluster.jobs()
    assert job["metadata"]["name"] == f"{name}-a1"
    assert affinity_classes(job) == {gpu.split()[0]}
    owner = job["metadata"]["ownerReferences"][0]
    assert owner["uid"] == cluster.ftj(name)["metadata"]["uid"] and owner["controller"] is True
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == gpu[-1]

    config = cluster.api.read("configmaps", NS, f"{name}-a1")
    assert config is not None
    trainer_config = json.loads(config["data"]["job.json"])
    assert trainer_config["gpuClass"] == gpu.split()[0]
    assert trainer_config["job"] == {"name": name, "namespace": NS}
    assert trainer_config["attempt"] == 1

    await eventually(lambda: any(e["reason"] == "JobCreated" and e["type"] == "Normal" for e in cluster.events(name)),
                     5, "a JobCreated event")


async def test_invalid_spec_fails_with_the_field_named_and_no_job(cluster: Cluster) -> None:
    await cluster.start_operator()
    await cluster.apply(finetunejob("bad", lora={"r": -4}))
    status = await cluster.wait_phase("bad", "Failed")

    assert "spec.lora.r" in status["message"] and ">= 1" in status["message"]
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Stalled"] == conditions["Stalled"] | {"status": "True", "reason": "InvalidSpec"}
    assert conditions["Ready"]["status"] == "False"
    events = await eventually(lambda: [e for e in cluster.events("bad") if e["reason"] == "InvalidSpec"])
    assert events[0]["type"] == "Warning" and "spec.lora.r" in events[0]["message"]
    assert cluster.jobs() == [] and cluster.api.items("configmaps", NS) == []

    # Fixing the spec (what a GitOps commit does) launches it.
    code, _ = await cluster.request("PATCH", f"/apis/kubetune.io/v1alpha1/namespaces/{NS}/finetunejobs/bad",
                                    {"spec": {"lora": {"r": 8}}}, "application/merge-patch+json")
    assert code == 200
    status = await cluster.wait_phase("bad", "Queued")
    assert status["observedGeneration"] == 2
    assert [j["metadata"]["name"] for j in cluster.jobs()] == ["bad-a1"]


async def test_no_node_of_the_class_is_pending_with_a_reason_then_placed(cluster: Cluster) -> None:
    await cluster.start_operator()
    # Pinned to a class the cluster lacks (an unpinned job plans onto a class the cluster has: test_cluster_plans).
    await cluster.apply(finetunejob("long", method="lora", resources={"gpuClass": "A100-40GB"}))
    status = await cluster.wait_phase("long", "Pending")

    assert status["plan"]["gpuClass"] == "A100-40GB"
    assert "A100-40GB" in status["message"] and "the cluster has:" in status["message"]
    assert "1x L4" in status["message"] and "1x H100-80GB" in status["message"]
    await eventually(lambda: any(e["reason"] == "NoMatchingNodes" and e["type"] == "Warning"
                                 for e in cluster.events("long")), 5, "a NoMatchingNodes event")
    assert cluster.jobs() == []

    await cluster.add_nodes([("gpu-a100-40-1", {"cloud.google.com/gke-accelerator": "nvidia-tesla-a100"}, 1)])
    status = await cluster.wait_phase("long", "Queued")
    assert [j["metadata"]["name"] for j in cluster.jobs()] == ["long-a1"]


async def test_progress_from_the_trainer_then_success(cluster: Cluster, trainer_standin: tuple[int, dict]) -> None:
    port, trainer = trainer_standin
    operator = await cluster.start_operator()
    await cluster.apply(finetunejob("run"))
    await cluster.wait_phase("run", "Queued")
    [job] = cluster.jobs()

    pod = await cluster.run_pod(job, "gpu-l4-1", port=port)
    status = await eventually(lambda: cluster.status("run") if cluster.status("run").get("step") else None)
    assert status["phase"] == "Running"
    assert status["step"] == "120/500" and status["loss"] == "1.234"
    assert status["progress"]["tokensPerSecond"] == 2100.0
    assert status["progress"]["peakMemoryBytes"] == 19_000_000_000

    trainer.update(step=480, loss=0.9)
    await eventually(lambda: cluster.status("run").get("step") == "480/500")
    writes = cluster.api.request_count("PATCH", "finetunejobs")
    await asyncio.sleep(1.0)  # three sweeps poll the trainer at rest: nothing to write
    assert cluster.api.request_count("PATCH", "finetunejobs") == writes

    summary = TerminationSummary(outcome=Outcome.SUCCEEDED, exit_code=0, steps=500, final_loss=0.8123,
                                 peak_memory_bytes=19_500_000_000, adapter_uri="s3://adapters/run/adapter/")
    await cluster.end_pod(pod, 0, summary.message())
    status = await cluster.wait_phase("run", "Succeeded")
    assert status["adapterUri"] == "s3://adapters/run/adapter/"
    assert status["loss"] == "0.812" and status["step"] == "500/500"
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions == {"Ready": "True", "Reconciling": "False", "Stalled": "False"}
    assert status["attempts"][-1]["outcome"] == "Succeeded"
    FineTuneJobStatus.model_validate(status)  # every field the operator writes is in the CRD's status schema
    reasons = await eventually(lambda: (r := [e["reason"] for e in cluster.events("run")]) and "Succeeded" in r and r)
    assert reasons.count("JobCreated") == 1 and "Training" in reasons

    text = operator.metrics.exposition().decode()
    assert 'kubetune_operator_reconcile_total{handler="trainer",result="ok"}' in text
    assert 'kubetune_operator_jobs{phase="Succeeded"} 1.0' in text
    assert "kubetune_operator_reconcile_duration_seconds_bucket" in text


async def test_out_of_gpu_memory_escalates_one_class_up_and_resumes(cluster: Cluster) -> None:
    operator = await cluster.start_operator()
    # maxGpuClass A100-40GB: the only class above L4 within the limit is one the cluster has no node of yet.
    await cluster.apply(finetunejob("oom", resources={"maxGpuClass": "A100-40GB"}))
    await cluster.wait_phase("oom", "Queued")
    [job] = cluster.jobs()
    assert cluster.status("oom")["gpu"] == "L4 x1"

    pod = await cluster.run_pod(job, "gpu-l4-1")
    await cluster.wait_phase("oom", "Running")
    message = TerminationSummary(outcome=Outcome.OUT_OF_MEMORY, exit_code=3, steps=37,
                                 error="CUDA out of memory at step 38").message()
    await cluster.end_pod(pod, 3, message)
    await cluster.finish_job("oom-a1", "Failed", "PodFailurePolicy")

    # The next class up (A100-40GB) has no node yet: Pending names it; a node appears; attempt 2 starts.
    status = await cluster.wait_phase("oom", "Pending")
    assert status["plan"]["gpuClass"] == "A100-40GB" and "A100-40GB" in status["message"]
    assert status["attempts"][0]["outcome"] == "OutOfMemory"
    assert "CUDA out of memory" in status["attempts"][0]["message"]
    await cluster.add_nodes([("gpu-a100-40-1", {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB"}, 4)])
    status = await cluster.wait_phase("oom", "Queued")

    assert status["jobName"] == "oom-a2" and status["gpu"] == "A100-40GB x1"
    assert [(a["attempt"], a["gpuClass"], a["outcome"]) for a in status["attempts"]] == [
        (1, "L4", "OutOfMemory"), (2, "A100-40GB", "Pending")]
    assert sorted(j["metadata"]["name"] for j in cluster.jobs()) == ["oom-a1", "oom-a2"]
    job2 = cluster.api.read("jobs", NS, "oom-a2")
    assert job2 is not None and affinity_classes(job2) == {"A100-40GB"}
    config = json.loads(cluster.api.read("configmaps", NS, "oom-a2")["data"]["job.json"])
    assert config["attempt"] == 2 and config["gpuClass"] == "A100-40GB"
    # the same output URI: the trainer resumes from <uri>/checkpoints/
    assert config["spec"]["output"]["uri"] == "s3://adapters/oom/"
    FineTuneJobStatus.model_validate(status)
    text = operator.metrics.exposition().decode()
    assert 'kubetune_operator_oom_escalations_total{from_class="L4",to_class="A100-40GB"} 1.0' in text


async def test_oom_on_a_pinned_class_fails_instead_of_looping(cluster: Cluster) -> None:
    await cluster.start_operator()
    await cluster.apply(finetunejob("pinned", resources={"gpuClass": "A10G"}))
    await cluster.wait_phase("pinned", "Queued")
    pod = await cluster.run_pod(cluster.jobs()[0], "gpu-a10g-1")
    await cluster.end_pod(pod, 0, "", reason="OOMKilled")
    status = await cluster.wait_phase("pinned", "Failed")
    assert "pinned to A10G, and a pinned class is never escalated" in status["message"]
    assert len(cluster.jobs()) == 1


async def test_operator_restart_mid_flight_creates_no_duplicates(cluster: Cluster) -> None:
    first = await cluster.start_operator()
    await cluster.apply(finetunejob("steady"))
    before = await cluster.wait_phase("steady", "Queued")
    await first.stop()

    # A job whose Job exists but whose status was never written: the crash came between the two.
    orphan = finetunejob("crashed")
    created = await cluster.apply(orphan)
    owner = Owner("crashed", NS, created["metadata"]["uid"], {})
    pre_existing = {"apiVersion": "batch/v1", "kind": "Job",
                    "metadata": {"name": child_name("crashed", 1), "namespace": NS,
                                 "labels": {"app.kubernetes.io/managed-by": "kubetune",
                                            "kubetune.io/finetunejob": "crashed", "kubetune.io/attempt": "1"},
                                 "ownerReferences": [owner.reference()]},
                    "spec": {"template": {"spec": {"containers": []}}}}
    await cluster.api.put_object("jobs", pre_existing)

    await cluster.start_operator()
    status = await cluster.wait_phase("crashed", "Queued")
    assert status["jobName"] == "crashed-a1"
    await eventually(lambda: cluster.status("steady") == before or None, 2, "steady status to stay")
    names = sorted(j["metadata"]["name"] for j in cluster.jobs())
    assert names == ["crashed-a1", "steady-a1"]
    assert cluster.api.request_count("POST", "jobs") == 2  # steady once, crashed once (409, adopted)


async def test_injected_conflicts_and_server_errors_are_survived(cluster: Cluster) -> None:
    cluster.api.inject("POST", "jobs", 500, times=2)
    cluster.api.inject("POST", "configmaps", 503, times=1)
    cluster.api.inject("PATCH", "finetunejobs", 409, times=1, subresource="status")
    cluster.api.inject("PATCH", "finetunejobs", 500, times=1, subresource="status")
    operator = await cluster.start_operator()
    await cluster.apply(finetunejob("flaky"))
    status = await cluster.wait_phase("flaky", "Queued", timeout=20)
    assert status["jobName"] == "flaky-a1"
    assert len(cluster.jobs()) == 1
    assert operator.crashed() is None

    # A dropped watch stream (API server restart) is re-established.
    await cluster.api.close_watches()
    await cluster.apply(finetunejob("after-disconnect"))
    await cluster.wait_phase("after-disconnect", "Queued")
    assert operator.crashed() is None


async def test_a_first_decision_that_fails_is_retried_by_the_resync(cluster: Cluster) -> None:
    """A reconcile that fails (here the Job POST fails past every backoff of the first reconcile: 6 tries) is
    tried again by the operator's resync task at its next wake-up; kopf sets no finalizer (no handler needs one)."""
    cluster.api.inject("POST", "jobs", 500, times=8)
    operator = await cluster.start_operator()
    await cluster.apply(finetunejob("stubborn"))
    status = await cluster.wait_phase("stubborn", "Queued", timeout=30)
    assert status["jobName"] == "stubborn-a1" and len(cluster.jobs()) == 1
    await eventually(lambda: cluster.events("stubborn"), 5, "the JobCreated event")  # kopf posts it after the status
    assert [e["reason"] for e in cluster.events("stubborn")] == ["JobCreated"]
    assert not cluster.ftj("stubborn")["metadata"].get("finalizers")
    assert operator.metrics.reconciles.labels("resync", "ok")._value.get() >= 1
    assert operator.crashed() is None


async def test_events_that_bring_nothing_new_are_not_reconciled(cluster: Cluster) -> None:
    """The echo of a status write or an annotation leave generation, labels and status as they were: no
    reconcile. A label (the Kueue queue is one) is news."""
    operator = await cluster.start_operator(poll_interval=60)  # no resync reconciles during the test
    await cluster.apply(finetunejob("calm"))
    await cluster.wait_phase("calm", "Queued")

    def reconciles() -> float:
        return operator.metrics.reconciles.labels("finetunejob", "ok")._value.get()

    before = reconciles()
    merge = "application/merge-patch+json"
    path = f"/apis/kubetune.io/v1alpha1/namespaces/{NS}/finetunejobs/calm"
    await cluster.request("PATCH", path, {"metadata": {"annotations": {"team": "search"}}}, merge)
    await asyncio.sleep(0.5)
    assert reconciles() == before
    await cluster.request("PATCH", path, {"metadata": {"labels": {"team": "search"}}}, merge)
    await eventually(lambda: reconciles() == before + 1, what="a reconcile for the label")


async def test_deletion_cascades_to_the_children(cluster: Cluster) -> None:
    await cluster.start_operator()
    await cluster.apply(finetunejob("gone"))
    await cluster.wait_phase("gone", "Queued")
    [job] = cluster.jobs()
    await cluster.run_pod(job, "gpu-l4-1")
    code, _ = await cluster.request("DELETE", f"/apis/kubetune.io/v1alpha1/namespaces/{NS}/finetunejobs/gone")
    assert code == 200
    await eventually(lambda: cluster.api.read("finetunejobs", NS, "gone") is None)
    assert cluster.jobs() == [] and cluster.api.items("configmaps", NS) == [] and cluster.api.items("pods", NS) == []


async def test_suspend_and_resume(cluster: Cluster) -> None:
    await cluster.start_operator()
    await cluster.apply(finetunejob("pause"))
    await cluster.wait_phase("pause", "Queued")
    path = f"/apis/kubetune.io/v1alpha1/namespaces/{NS}/finetunejobs/pause"

    await cluster.request("PATCH", path, {"spec": {"suspend": True}}, "application/merge-patch+json")
    status = await cluster.wait_phase("pause", "Suspended")
    assert cluster.api.read("jobs", NS, "pause-a1")["spec"]["suspend"] is True
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions == {"Ready": "False", "Reconciling": "False", "Stalled": "False"}
    await eventually(lambda: any(e["reason"] == "Suspended" for e in cluster.events("pause")), 5, "Suspended event")

    await cluster.request("PATCH", path, {"spec": {"suspend": False}}, "application/merge-patch+json")
    await cluster.wait_phase("pause", "Queued")
    assert cluster.api.read("jobs", NS, "pause-a1")["spec"]["suspend"] is False
    assert len(cluster.jobs()) == 1


async def test_suspended_from_the_start(cluster: Cluster) -> None:
    await cluster.start_operator()
    await cluster.apply(finetunejob("later", suspend=True))
    status = await cluster.wait_phase("later", "Suspended")
    assert status["jobName"] == "later-a1"
    assert cluster.jobs()[0]["spec"]["suspend"] is True


@pytest.mark.parametrize("by_label", [False, True])
async def test_kueue_queue_label_and_suspended_job(cluster: Cluster, by_label: bool) -> None:
    await cluster.start_operator()
    if by_label:
        body = finetunejob("queued", labels={"kueue.x-k8s.io/queue-name": "team-a"})
    else:
        body = finetunejob("queued", queue="team-a")
    await cluster.apply(body)
    status = await cluster.wait_phase("queued", "Queued")
    assert {c["type"]: c["reason"] for c in status["conditions"]}["Ready"] == "WaitingForKueue"
    [job] = cluster.jobs("kueue.x-k8s.io/queue-name=team-a")
    assert job["spec"]["suspend"] is True

    # Kueue admits it: unsuspends the Job; a pod starts.
    await cluster.api.patch_object("jobs", NS, "queued-a1", {"spec": {"suspend": False}})
    await cluster.run_pod(cluster.api.read("jobs", NS, "queued-a1"), "gpu-l4-1")
    await cluster.wait_phase("queued", "Running")


async def test_the_examples_land_where_their_comments_say(cluster: Cluster) -> None:
    import yaml

    await cluster.start_operator()
    root = Path(__file__).resolve().parents[2] / "examples"
    expected = {"llama-8b-a10g.yaml": "A10G x1", "llama-70b-a100.yaml": "A100-80GB x1",
                "pinned-h100.yaml": "H100-80GB x1", "kueue.yaml": "L4 x1"}
    bodies = {name: yaml.safe_load((root / name).read_text()) for name in expected}
    for body in bodies.values():
        await cluster.apply(body)
    for name, gpu in expected.items():
        meta = bodies[name]["metadata"]
        status = await eventually(lambda m=meta: (s := cluster.api.read("finetunejobs", m["namespace"], m["name"])
                                                  or {}).get("status", {}).get("phase") == "Queued" and s["status"],
                                  10, f"{name} to be Queued")
        assert status["gpu"] == gpu, name
    kueue_job = cluster.api.read("jobs", "team-a", "qwen-7b-team-a-a1")
    assert kueue_job is not None and kueue_job["spec"]["suspend"] is True
    assert kueue_job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"


async def test_a_failed_trainer_fails_the_job_with_its_error(cluster: Cluster) -> None:
    await cluster.start_operator()
    await cluster.apply(finetunejob("broken"))
    await cluster.wait_phase("broken", "Queued")
    pod = await cluster.run_pod(cluster.jobs()[0], "gpu-l4-1")
    await cluster.wait_phase("broken", "Running")
    await cluster.finish_job("broken-a1", "Failed", "BackoffLimitExceeded")
    await cluster.end_pod(pod, 4, TerminationSummary(outcome=Outcome.STORAGE_ERROR, exit_code=4,
                                                     error="s3://adapters: AccessDenied").message())
    status = await cluster.wait_phase("broken", "Failed")
    assert status["message"] == "s3://adapters: AccessDenied"
    conditions = {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}
    assert conditions["Stalled"] == ("True", "TrainingFailed")
    assert status["attempts"][0]["outcome"] == "Failed"
    assert len(cluster.jobs()) == 1


async def test_a_foreign_object_with_the_child_name_is_not_adopted(cluster: Cluster) -> None:
    await cluster.api.put_object("configmaps", {"apiVersion": "v1", "kind": "ConfigMap",
                                                "metadata": {"name": "taken-a1", "namespace": NS}, "data": {}})
    await cluster.start_operator()
    await cluster.apply(finetunejob("taken"))
    status = await cluster.wait_phase("taken", "Failed")
    assert {c["type"]: c["reason"] for c in status["conditions"]}["Stalled"] == "ChildNameTaken"
    assert "ConfigMap ml/taken-a1 exists and is not owned by this FineTuneJob" in status["message"]
    assert cluster.jobs() == []
    assert "ownerReferences" not in cluster.api.read("configmaps", NS, "taken-a1")["metadata"]


async def test_two_replicas_with_peering_fail_over(cluster: Cluster) -> None:
    await cluster.api.put_object("clusterkopfpeerings", {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering",
                                                         "metadata": {"name": "kubetune"}})
    leader = await cluster.start_operator(priority=200, peering="kubetune")
    standby = await cluster.start_operator(priority=100, peering="kubetune")
    await cluster.apply(finetunejob("first"))
    await cluster.wait_phase("first", "Queued")

    def priorities() -> list[int]:
        peers = (cluster.api.read("clusterkopfpeerings", None, "kubetune") or {}).get("status") or {}
        return sorted(p["priority"] for p in peers.values() if p)

    await eventually(lambda: priorities() == [100, 200], 10, "both replicas in the peering object")
    await cluster.apply(finetunejob("during"))
    await cluster.wait_phase("during", "Queued")
    assert "kubetune_operator_reconcile_total{" in leader.metrics.exposition().decode()
    assert "kubetune_operator_reconcile_total{" not in standby.metrics.exposition().decode()  # paused by the peering

    await leader.stop()  # a clean exit removes the leader from the peering object; the standby resumes
    await cluster.apply(finetunejob("second"))
    await cluster.wait_phase("second", "Queued", timeout=20)
    assert sorted(j["metadata"]["name"] for j in cluster.jobs()) == ["during-a1", "first-a1", "second-a1"]
    assert "kubetune_operator_reconcile_total{" in standby.metrics.exposition().decode()
    assert standby.crashed() is None


async def test_suspending_a_queued_job_leaves_admission_to_kueue(cluster: Cluster) -> None:
    await cluster.start_operator()
    await cluster.apply(finetunejob("kq", queue="team-a"))
    await cluster.wait_phase("kq", "Queued")
    path = f"/apis/kubetune.io/v1alpha1/namespaces/{NS}/finetunejobs/kq"
    await cluster.request("PATCH", path, {"spec": {"suspend": True}}, "application/merge-patch+json")
    await cluster.wait_phase("kq", "Suspended")
    await cluster.request("PATCH", path, {"spec": {"suspend": False}}, "application/merge-patch+json")
    status = await cluster.wait_phase("kq", "Queued")
    assert status["message"].endswith("when Kueue queue team-a admits it")
    assert cluster.api.read("jobs", NS, "kq-a1")["spec"]["suspend"] is True
    await cluster.request("PATCH", path, {"spec": {"lora": {"r": 8}}}, "application/merge-patch+json")
    await eventually(lambda: any(e["reason"] == "SpecChangeDeferred" for e in cluster.events("kq")), 5,
                     "a SpecChangeDeferred event")
    assert cluster.status("kq")["observedGeneration"] == 4
