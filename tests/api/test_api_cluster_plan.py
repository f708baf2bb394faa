"""The API plans against the cluster's GPU nodes, as the operator does, when the identity it acts with may
list Nodes; otherwise against the whole catalog (test_api.py)."""

from __future__ import annotations

import sys
from pathlib import Path

from kt_api import JOB
from kt_auth import Rule

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))
from kt_cluster import node

# The cluster of issue 10's report: A10G and A100-80GB nodes, no L4.
NODES = [node("g5-1", {"nvidia.com/gpu.product": "NVIDIA-A10G"}, 1),
         node("p4d-1", {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}, 8)]


async def test_submit_and_preview_plan_onto_the_classes_the_cluster_has(stack) -> None:
    for body in NODES:
        await stack.kube.put_object("nodes", body)
    assert (await stack.client.post("/v1/plan", json=JOB)).json()["gpuClass"] == "L4"  # may not list Nodes
    stack.kube.rules.append(Rule("team-a-devs", "list", "nodes"))

    preview = (await stack.client.post("/v1/plan", json=JOB)).json()
    assert preview["gpuClass"] == "A10G"
    assert "L4: no nodes in the cluster and not provisionable" in preview["reasons"]
    created = await stack.client.post("/v1/namespaces/team-a/finetunejobs", json=JOB)
    assert created.status_code == 201, created.text
    assert created.json()["plan"]["gpuClass"] == "A10G"


def plan_cache(text: str) -> tuple[float, float]:
    """(hits, misses) from the API's /metrics."""
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("kubetune_plan_cache_"))
    return float(values["kubetune_plan_cache_hits_total"]), float(values["kubetune_plan_cache_misses_total"])


async def test_the_same_spec_against_the_same_inventory_is_planned_once(stack) -> None:
    stack.kube.rules.append(Rule("team-a-devs", "list", "nodes"))
    await stack.kube.put_object("nodes", NODES[1])
    first = (await stack.client.post("/v1/plan", json=JOB)).json()
    again = (await stack.client.post("/v1/plan", json=JOB)).json()
    assert again == first and first["gpuClass"] == "A100-80GB"
    created = await stack.client.post("/v1/namespaces/team-a/finetunejobs", json=JOB)  # submit plans too
    assert created.status_code == 201, created.text
    metrics = await stack.client.get("/metrics")
    assert metrics.status_code == 200 and plan_cache(metrics.text) == (2, 1)

    await stack.kube.put_object("nodes", NODES[0])  # a new inventory: planned again, onto the A10G node
    assert (await stack.client.post("/v1/plan", json=JOB)).json()["gpuClass"] == "A10G"
    changed = {**JOB, "spec": {**JOB["spec"], "evaluation": {"maxNewTokens": 512}}}  # a new spec: planned again
    assert (await stack.client.post("/v1/plan", json=changed)).status_code == 200
    assert plan_cache((await stack.client.get("/metrics")).text) == (2, 3)
