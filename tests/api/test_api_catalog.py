"""What the page reads besides jobs: GPUs and free capacity, models, the spec's schema, namespaces, quotas."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from kt_api import JOB, MakeStack, Stack
from kt_auth import Rule

from kubetune.planning.models import CATALOG
from kubetune.spec import FineTuneJobSpec

BASE = "/v1/namespaces/team-a/finetunejobs"
BOB = {"Authorization": "Bearer team-b-token"}


def node(name: str, product: str, gpus: int) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {"nvidia.com/gpu.product": product}},
            "status": {"allocatable": {"nvidia.com/gpu": str(gpus)}}}


def gpu_pod(name: str, node_name: str, gpus: int, phase: str = "Running") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "team-a"},
            "spec": {"nodeName": node_name, "containers": [{"name": "c", "resources": {
                "limits": {"nvidia.com/gpu": str(gpus)}}}]}, "status": {"phase": phase}}


async def test_gpus_free_per_class_from_the_nodes_and_pods(stack: Stack) -> None:
    await stack.kube.put_object("nodes", node("l4-a", "NVIDIA-L4", 4))
    await stack.kube.put_object("nodes", node("l4-b", "NVIDIA-L4", 2))
    await stack.kube.put_object("pods", gpu_pod("busy", "l4-a", 3))
    await stack.kube.put_object("pods", gpu_pod("done", "l4-b", 2, phase="Succeeded"))  # holds nothing
    unknown = (await stack.client.get("/v1/gpus")).json()  # alice may not list Nodes
    assert unknown["inventory"] is False and "no inventory" in unknown["message"]
    assert {c["name"]: c["freeGpus"] for c in unknown["classes"]}["L4"] is None

    stack.kube.rules += [Rule("team-a-devs", "list", "nodes"), Rule("team-a-devs", "list", "pods")]
    body = (await stack.client.get("/v1/gpus")).json()
    classes = {c["name"]: c for c in body["classes"]}
    assert body["inventory"] is True
    assert classes["L4"] == {**classes["L4"], "nodes": 2, "allocatableGpus": 6, "freeGpus": 3,
                             "mostFreeOnOneNode": 2, "memoryGiB": 22.5, "hourlyPrice": 0.8}
    assert classes["H100-80GB"]["nodes"] == 0 and classes["H100-80GB"]["freeGpus"] == 0
    prices = [c["hourlyPrice"] for c in body["classes"]]
    assert prices == sorted(prices)


async def test_models_and_the_schema_come_from_the_catalog_and_the_spec_model(stack: Stack) -> None:
    models = (await stack.client.get("/v1/models")).json()["items"]
    assert len(models) == len(CATALOG)
    llama = next(m for m in models if m["name"] == "meta-llama/Llama-3.1-8B")
    assert llama["layers"] == 32 and llama["parameters"] > 7_000_000_000
    schema = (await stack.client.get("/v1/schema/finetunejob")).json()
    assert schema == FineTuneJobSpec.model_json_schema(by_alias=True)
    assert {"model", "dataset", "output", "lora", "resources"} <= set(schema["properties"])
    assert (await stack.client.get("/v1/models", headers={"Authorization": ""})).status_code == 401


async def test_namespaces_are_those_the_caller_may_use(make_stack: MakeStack) -> None:
    async with make_stack() as stack:
        for name in ("kube-system", "team-a", "team-b"):
            await stack.kube.put_object("namespaces", {"metadata": {"name": name}})
        refused = (await stack.client.get("/v1/namespaces")).json()  # alice may not list Namespaces
        assert refused["namespaces"] == [] and "cannot list namespaces" in refused["message"]
        stack.kube.rules.append(Rule("system:authenticated", "list", "namespaces"))
        assert (await stack.client.get("/v1/namespaces")).json()["namespaces"] == ["team-a"]
        assert (await stack.client.get("/v1/namespaces", headers=BOB)).json()["namespaces"] == ["team-b"]
    async with make_stack(namespaces=("team-a", "team-b", "team-c")) as stack:
        answer = (await stack.client.get("/v1/namespaces")).json()
        assert answer == {"namespaces": ["team-a"], "source": "configured", "message": ""}


QUOTA_CASES = [  # (limits for team-a, jobs already running there (GPUs each), status, the limit named)
    ({"allowedGpuClasses": ["A10G", "A100-80GB"]}, [], 403, "quota allowedGpuClasses is [A10G, A100-80GB]; "
                                                            "the plan needs L4"),
    ({"maxEstimatedCost": 0.01}, [], 403, "quota maxEstimatedCost is 0.01; the plan's estimated cost is"),
    ({"maxConcurrentJobs": 1}, [1], 429, "quota maxConcurrentJobs is 1; 1 FineTuneJobs are already queued or "
                                         "running"),
    ({"maxGpus": 4}, [2, 2], 429, "quota maxGpus is 4; 4 GPUs are in use and this job's plan needs 1 more"),
    ({"maxConcurrentJobs": 2, "maxGpus": 4, "allowedGpuClasses": ["L4"]}, [2], 201, None),
]


@pytest.mark.parametrize(("limits", "running", "status", "named"), QUOTA_CASES)
async def test_submit_is_refused_by_the_namespace_quota_naming_the_limit(
        make_stack: MakeStack, tmp_path: Path, limits: dict[str, Any], running: list[int], status: int,
        named: str | None) -> None:
    quotas = tmp_path / "quotas.yaml"
    quotas.write_text(yaml.safe_dump({"default": {"maxConcurrentJobs": 50}, "namespaces": {"team-a": limits}}))
    async with make_stack(quotas_file=str(quotas)) as stack:
        for index, gpus in enumerate(running):
            name = f"busy-{index}"
            await stack.kube.put_object("finetunejobs", {**JOB, "metadata": {"name": name, "namespace": "team-a"}})
            await stack.kube.patch_object("finetunejobs", "team-a", name, {"status": {
                "phase": "Running", "plan": {"gpuClass": "L4", "gpuCount": gpus}}})
        await stack.kube.put_object("finetunejobs", {**JOB, "metadata": {"name": "old", "namespace": "team-a"}})
        await stack.kube.patch_object("finetunejobs", "team-a", "old", {"status": {  # finished: holds nothing
            "phase": "Succeeded", "plan": {"gpuClass": "L4", "gpuCount": 8}}})
        response = await stack.client.post(BASE, json=JOB)
        assert response.status_code == status, response.text
        if named:
            assert response.json()["detail"].startswith(f"namespace team-a: {named}")
            assert stack.kube.get("finetunejobs", "team-a", "support-bot") is None
            assert (response.headers.get("retry-after") is not None) == (status == 429)

        shown = (await stack.client.get("/v1/namespaces/team-a/quota")).json()
        assert shown["limits"] == {"maxConcurrentJobs": 50, "maxGpus": None, "allowedGpuClasses": None,
                                   "maxEstimatedCost": None, **limits}
        # a job just created has no phase yet: the operator counts it once it is Queued (kubetune.quota)
        assert shown["usage"] == {"concurrentJobs": len(running), "gpus": sum(running)}
        assert shown["kueue"] is None
        assert (await stack.client.get("/v1/namespaces/team-a/quota", headers=BOB)).status_code == 403


async def test_with_kueue_served_the_quota_reports_the_cluster_queue_admission_state(stack: Stack) -> None:
    from kt_emulator import Kind

    stack.kube.register(Kind("kueue.x-k8s.io", "v1beta1", "localqueues", "LocalQueue", namespaced=True))
    stack.kube.register(Kind("kueue.x-k8s.io", "v1beta1", "clusterqueues", "ClusterQueue", namespaced=False))
    stack.kube.rules += [Rule("team-a-devs", "list", "localqueues.kueue.x-k8s.io", "team-a"),
                         Rule("team-a-devs", "get", "clusterqueues.kueue.x-k8s.io")]
    admission = {"pendingWorkloads": 2, "admittedWorkloads": 1, "reservingWorkloads": 1,
                 "conditions": [{"type": "Active", "status": "True", "reason": "Ready"}],
                 "flavorsUsage": [{"name": "l4", "resources": [{"name": "nvidia.com/gpu", "total": "4"}]}]}
    await stack.kube.put_object("clusterqueues", {"metadata": {"name": "gpu-cq"}, "spec": {}}, group="kueue.x-k8s.io")
    await stack.kube.patch_object("clusterqueues", None, "gpu-cq", {"status": admission}, group="kueue.x-k8s.io")
    await stack.kube.put_object("localqueues", {"metadata": {"name": "team-a-q", "namespace": "team-a"},
                                                "spec": {"clusterQueue": "gpu-cq"}}, group="kueue.x-k8s.io")
    shown = (await stack.client.get("/v1/namespaces/team-a/quota")).json()
    assert shown["limits"] is None
    [queue] = shown["kueue"]["localQueues"]
    assert queue["name"] == "team-a-q" and queue["clusterQueue"] == "gpu-cq"
    assert queue["clusterQueueStatus"] == admission
