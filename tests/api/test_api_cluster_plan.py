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
