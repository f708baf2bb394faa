"""A multi-node FineTuneJob through the real kopf operator against the emulator: the headless Service and the
Indexed Job, or, where the cluster serves jobset.x-k8s.io, a JobSet; the test plays the Job (and JobSet)
controller and the kubelet by writing objects, as test_operator_flow.py does."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from kt_cluster import NS, Cluster, eventually, finetunejob
from kt_emulator import Kind
from kubetune_operator import cache, handlers, scaleout

from kubetune import wire
from kubetune.contracts import Outcome, TerminationSummary
from kubetune.planning.gpus import load_catalog

JOBSETS = Kind(wire.JOBSET_GROUP, wire.JOBSET_VERSION, "jobsets", "JobSet", namespaced=True)
GANG = {"resources": {"gpuClass": "A10G", "gpuCount": 2, "strategy": "ddp"}}
DONE = TerminationSummary(outcome=Outcome.SUCCEEDED, exit_code=0, steps=500, total_steps=500,
                          adapter_uri="s3://adapters/wide/adapter/").message()


@pytest.fixture
def one_a10g_per_node(tmp_path: Path) -> Path:
    """A GPU catalog override: A10G nodes hold one GPU each (g5.xlarge), so two A10G are two nodes."""
    a10g = load_catalog().get("A10G", "test")
    path = tmp_path / "gpus.yaml"
    path.write_text(yaml.safe_dump({"classes": [{
        "name": "A10G", "memoryGiB": a10g.memory_bytes / 1024**3, "hourlyPrice": a10g.hourly_price,
        "nodeLabels": [dict(labels) for labels in a10g.node_labels], "maxPerNode": 1}]}))
    return path


async def start(cluster: Cluster, catalog: Path, **settings: Any) -> None:
    await cluster.add_nodes([("gpu-a10g-2", {"nvidia.com/gpu.product": "NVIDIA-A10G"}, 1)])
    await cluster.start_operator(gpu_catalog=catalog, **settings)


async def run_pod(cluster: Cluster, owner: dict[str, Any], template: dict[str, Any], index: int,
                  annotation: str, node: str, port: int = 8000) -> dict[str, Any]:
    """A running pod of `owner` (a Job), as the Job controller and a kubelet would make it."""
    name = owner["metadata"]["name"]
    pod = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": f"{name}-{index}-{uuid.uuid4().hex[:5]}", "namespace": NS,
                     "labels": {**template["metadata"]["labels"], "batch.kubernetes.io/job-name": name,
                                **({cache.JOBSET_NAME: owner["metadata"]["labels"][cache.JOBSET_NAME]}
                                   if cache.JOBSET_NAME in owner["metadata"]["labels"] else {})},
                     "annotations": {**template["metadata"].get("annotations", {}), annotation: str(index),
                                     "prometheus.io/port": str(port)},
                     "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": name,
                                          "uid": owner["metadata"]["uid"], "controller": True}]},
        "spec": {**template["spec"], "nodeName": node, "hostname": f"{name}-{index}"},
        "status": {"phase": "Running", "podIP": "127.0.0.1",
                   "containerStatuses": [{"name": "trainer", "ready": True, "restartCount": 0,
                                          "state": {"running": {"startedAt": "2026-11-30T08:00:00Z"}}}]},
    }
    return await cluster.api.put_object("pods", pod)


async def test_an_indexed_job_and_its_service_run_two_nodes(cluster: Cluster, one_a10g_per_node: Path,
                                                            trainer_standin: tuple[int, dict]) -> None:
    port, _ = trainer_standin
    await start(cluster, one_a10g_per_node, rendezvous_port=29411)
    await cluster.apply(finetunejob("wide", **GANG))
    status = await cluster.wait_phase("wide", "Queued")
    assert status["jobName"] == "wide-a1" and status["gpu"] == "A10G x2 DDP, 2 nodes"
    service = cluster.api.read("services", NS, "wide-a1")
    [job] = cluster.jobs()
    assert service is not None and service["spec"]["clusterIP"] == "None"
    assert service["spec"]["ports"][0]["port"] == 29411
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["parallelism"] == 2

    template = job["spec"]["template"]
    first = await run_pod(cluster, job, template, 0, scaleout.COMPLETION_INDEX, "gpu-a10g-1", port)
    await asyncio.sleep(1.0)
    assert cluster.status("wide")["phase"] == "Queued"  # one rank of two: it waits in the rendezvous
    second = await run_pod(cluster, job, template, 1, scaleout.COMPLETION_INDEX, "gpu-a10g-2", port + 1)
    status = await eventually(lambda: cluster.status("wide") if cluster.status("wide").get("step") else None)
    assert status["phase"] == "Running" and status["step"] == "120/500"  # node 0's /status

    await cluster.end_pod(second, 0)
    await cluster.end_pod(first, 0, DONE)
    await asyncio.sleep(0.5)
    assert cluster.status("wide")["phase"] == "Running"  # until the Job says all indexes completed
    await cluster.finish_job("wide-a1", "Complete")
    status = await cluster.wait_phase("wide", "Succeeded")
    assert status["adapterUri"] == "s3://adapters/wide/adapter/"


async def test_a_jobset_where_the_cluster_serves_it(cluster: Cluster, one_a10g_per_node: Path) -> None:
    cluster.api.register(JOBSETS)  # the JobSet CRD is installed
    await start(cluster, one_a10g_per_node)
    await cluster.apply(finetunejob("wide", queue="team-a", **GANG))
    status = await cluster.wait_phase("wide", "Queued")
    assert status["jobName"] == "wide-a1" and "Kueue" in status["message"]
    [jobset] = cluster.api.items("jobsets", NS)
    assert jobset["spec"]["suspend"] is True and jobset["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == \
        "team-a"
    assert cluster.jobs() == [] and cluster.api.items("services", NS) == []  # the JobSet controller makes them

    # Kueue admits the JobSet; its controller makes one Job per node, and their pods run.
    await cluster.api.patch_object("jobsets", NS, "wide-a1", {"spec": {"suspend": False}})
    rjob = jobset["spec"]["replicatedJobs"][0]
    pods = []
    for index in range(2):
        labels = {**rjob["template"]["metadata"]["labels"], cache.JOBSET_NAME: "wide-a1"}
        child = await cluster.api.put_object("jobs", {
            "apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": f"wide-a1-node-{index}", "namespace": NS, "labels": labels,
                         "ownerReferences": [{"apiVersion": scaleout.JOBSET_API, "kind": "JobSet", "name": "wide-a1",
                                              "uid": jobset["metadata"]["uid"], "controller": True}]},
            "spec": rjob["template"]["spec"]})
        pods.append(await run_pod(cluster, child, rjob["template"]["spec"]["template"], index,
                                  scaleout.JOBSET_JOB_INDEX, f"gpu-a10g-{index + 1}"))
    await cluster.wait_phase("wide", "Running")

    # A tenant's pod that copies the labels is not believed (its owner is not a Job of this JobSet).
    fake = dict(pods[0])
    fake["metadata"] = {**pods[0]["metadata"], "name": "impostor", "ownerReferences": [
        {"apiVersion": "batch/v1", "kind": "Job", "name": "x", "uid": "not-ours", "controller": True}]}
    fake["metadata"].pop("uid"), fake["metadata"].pop("resourceVersion")
    await cluster.api.put_object("pods", fake)
    await cluster.end_pod(fake, 0, TerminationSummary(outcome=Outcome.SUCCEEDED, exit_code=0,
                                                      adapter_uri="s3://evil/").message())

    for pod in pods:
        await cluster.end_pod(pod, 0, DONE)
    await cluster.api.patch_object("jobsets", NS, "wide-a1", {"status": {"terminalState": "Completed", "conditions": [
        {"type": "Completed", "status": "True", "reason": "AllJobsCompleted"}]}})
    status = await cluster.wait_phase("wide", "Succeeded")
    assert status["adapterUri"] == "s3://adapters/wide/adapter/"


async def test_a_jobset_is_suspended_and_resumed_by_spec_suspend(cluster: Cluster, one_a10g_per_node: Path) -> None:
    cluster.api.register(JOBSETS)
    await start(cluster, one_a10g_per_node)
    await cluster.apply(finetunejob("pause", **GANG))
    await cluster.wait_phase("pause", "Queued")
    path = f"/apis/kubetune.io/v1alpha1/namespaces/{NS}/finetunejobs/pause"
    await cluster.request("PATCH", path, {"spec": {"suspend": True}}, "application/merge-patch+json")
    await cluster.wait_phase("pause", "Suspended")
    assert cluster.api.read("jobsets", NS, "pause-a1")["spec"]["suspend"] is True  # type: ignore[index]
    await cluster.request("PATCH", path, {"spec": {"suspend": False}}, "application/merge-patch+json")
    await cluster.wait_phase("pause", "Queued")
    assert cluster.api.read("jobsets", NS, "pause-a1")["spec"]["suspend"] is False  # type: ignore[index]


async def test_discovery_is_asked_again_after_a_while(cluster: Cluster, one_a10g_per_node: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """JobSet installed while the operator runs: the next multi-node attempt after the discovery interval uses
    it (kopf starts watching the new API once it sees its CRD; the emulator serves no CRDs, so this test stops
    at the create)."""
    monkeypatch.setattr(handlers, "DISCOVERY_SECONDS", 0.0)
    await start(cluster, one_a10g_per_node)
    await cluster.apply(finetunejob("before", **GANG))
    await cluster.wait_phase("before", "Queued")
    assert [j["metadata"]["name"] for j in cluster.jobs()] == ["before-a1"]
    cluster.api.register(JOBSETS)
    await cluster.apply(finetunejob("after", **GANG))
    await eventually(lambda: cluster.api.items("jobsets", NS), 10, "a JobSet")
    assert [j["metadata"]["name"] for j in cluster.api.items("jobsets", NS)] == ["after-a1"]
