"""Multi-node for real: a FineTuneJob planned on two nodes (2 x 1 A10G: the catalog holds one per node) runs as a
headless Service and an Indexed Job whose two pods the test kubelet runs as two local processes. Each pod runs
torchrun (`kubetune_trainer.launch`); they meet in the c10d rendezvous on pod 0, found by its cluster DNS name
(the kubelet resolves it to pod 0's IP), train DDP ranks on the CPU with gloo, and the adapter lands in S3.
A rank killed mid-run fails the attempt; the operator's next attempt resumes every rank from the checkpoint.

The model is a tiny random Llama (SmolLM2's tokenizer) published on the test hub: the point is the wiring,
and two ranks of SmolLM2 on this 2-core machine would take minutes more.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from kt_cluster import NS
from kt_life import CHECKPOINT_STEPS, MAX_STEPS, World, free_port
from kubetune_operator import scaleout
from test_life import adapter_files, check_manifest, wait_events

from kubetune import wire
from kubetune.planning.gpus import load_catalog

pytestmark = pytest.mark.slow

GANG = {"gpuClass": "A10G", "gpuCount": 2, "strategy": "ddp"}


@pytest.fixture
def model(tiny_repo: str) -> dict[str, Any]:
    return {"name": tiny_repo}


@pytest.fixture
async def two_nodes(world: World, tmp_path: Path) -> World:
    """A second A10G node, a catalog with one A10G per node, a free rendezvous port, and the second pod's metrics
    on another port (pods share the host's ports here, as hostNetwork pods do)."""
    await world.cluster.add_nodes([("gpu-a10g-2", {"nvidia.com/gpu.product": "NVIDIA-A10G"}, 1)])
    a10g = load_catalog().get("A10G", "test")
    catalog = tmp_path / "gpus.yaml"
    catalog.write_text(yaml.safe_dump({"classes": [{
        "name": "A10G", "memoryGiB": a10g.memory_bytes / 1024**3, "hourlyPrice": a10g.hourly_price,
        "nodeLabels": [dict(labels) for labels in a10g.node_labels], "maxPerNode": 1}]}))
    for operator in list(world.cluster.operators):
        await operator.stop()
    world.cluster.operators.clear()
    world.operator_settings.update(gpu_catalog=catalog, rendezvous_port=free_port())
    await world.start_operator()
    world.kubelet.inject_env(lambda pod: index_of(pod) == 1, {wire.ENV_TRAINER_PORT: str(free_port())})
    return world


def index_of(pod: dict[str, Any]) -> int | None:
    value = (pod["metadata"].get("annotations") or {}).get(scaleout.COMPLETION_INDEX)
    return None if value is None else int(value)


def terminated(pod: dict[str, Any]) -> dict[str, Any]:
    return dict(pod["status"]["containerStatuses"][0]["state"]["terminated"])


FSDP_RANKS = '"message": "2 ranks, FSDP2: 2 units (decoder layers, an untied input embedding) and the root sharded'


async def test_two_pods_rendezvous_train_and_write_the_adapter(two_nodes: World) -> None:
    """DDP; FSDP's seam (the planner's strategy through the ConfigMap to FSDP2 sharding over two pods) is the
    killed-rank test's, which also resumes it."""
    world = two_nodes
    started = time.perf_counter()
    await world.apply("wide", resources=GANG)
    done = await world.wait_phase("wide", "Succeeded")
    seconds = time.perf_counter() - started

    assert done["gpu"] == "A10G x2 DDP, 2 nodes" and done["jobName"] == "wide-a1"
    [job] = world.jobs("wide")
    assert (job["spec"]["completionMode"], job["spec"]["completions"], job["spec"]["parallelism"]) == \
        ("Indexed", 2, 2)
    service = world.cluster.api.read("services", NS, "wide-a1")
    assert service is not None and service["spec"]["clusterIP"] == "None"
    pods = sorted(world.pods_seen({"wide-a1"}).values(), key=lambda p: index_of(p) or 0)
    assert [index_of(p) for p in pods] == [0, 1]
    assert {p["spec"]["nodeName"] for p in pods} == {"gpu-a10g-1", "gpu-a10g-2"}  # one pod per node
    assert pods[0]["status"]["podIP"] != pods[1]["status"]["podIP"]
    assert [terminated(p)["exitCode"] for p in pods] == [0, 0]
    summary = json.loads(terminated(pods[0])["message"])  # node 0 is global rank 0: it tells the story
    assert summary["outcome"] == "Succeeded" and summary["steps"] == MAX_STEPS

    # The two torchrun agents met in one rendezvous: pod 0 (index 0) runs global rank 0 of 2, which logs the
    # story (steps, checkpoints); rank 1 logs only what goes wrong.
    logs = [world.trainer_log(p["metadata"]["name"]) for p in pods]
    assert '"message": "2 ranks, DDP over the LoRA parameters"' in logs[0], logs[0][-3000:]
    assert logs[0].count('"event": "step"') == MAX_STEPS and '"event": "checkpoint"' in logs[0]
    assert '"event": "step"' not in logs[1] and '"event": "done"' not in logs[1], logs[1][-3000:]

    running = [s for s in world.history("wide") if s.get("phase") == "Running"]
    assert running and "2 nodes" in running[0]["message"]
    assert done["adapterUri"] == f"s3://{world.bucket}/adapters/wide/adapter"
    manifest = check_manifest(adapter_files(world, "wide"))
    assert manifest["metrics"]["steps"] == MAX_STEPS
    await wait_events(world, "wide")
    ran = [f"{world.pod_seconds(p['metadata']['name']):.1f}s" for p in pods]
    print(f"\ntwo-node life: kubectl apply -> Succeeded in {seconds:.1f}s; pods ran {' and '.join(ran)}")


async def test_a_killed_rank_fails_the_attempt_and_the_next_resumes(two_nodes: World) -> None:
    """FSDP2 over two pods: rank 1 dies after the step-2 checkpoint; attempt 2 reshards and resumes every rank."""
    world = two_nodes
    world.kubelet.inject_env(lambda pod: pod["metadata"]["name"].startswith("broken-a1-1-"),
                             {"KUBETUNE_FAULT_KILL_AT_STEP": str(CHECKPOINT_STEPS + 1)})
    started = time.perf_counter()
    await world.apply("broken", resources={**GANG, "strategy": "fsdp"})
    done = await world.wait_phase("broken", "Succeeded")
    seconds = time.perf_counter() - started

    attempts = done["attempts"]
    assert [(a["attempt"], a["outcome"]) for a in attempts] == [(1, "Failed"), (2, "Succeeded")], attempts
    assert "node 1" in attempts[0]["message"] and "137" in attempts[0]["message"], attempts[0]
    assert attempts[1]["resumedFromStep"] == CHECKPOINT_STEPS  # every rank resumed from the checkpoint
    assert sorted(j["metadata"]["name"] for j in world.jobs("broken")) == ["broken-a1", "broken-a2"]
    first = world.pods_seen({"broken-a1"})
    killed = next(p for p in first.values() if index_of(p) == 1)
    assert terminated(killed)["exitCode"] == 137
    second = sorted(world.pods_seen({"broken-a2"}).values(), key=lambda p: index_of(p) or 0)
    log = world.trainer_log(second[0]["metadata"]["name"])
    assert f"at step {CHECKPOINT_STEPS}/{MAX_STEPS}" in log, log[-3000:]
    assert FSDP_RANKS in log and done["gpu"] == "A10G x2 FSDP, 2 nodes", log[-3000:]
    check_manifest(adapter_files(world, "broken"))
    await wait_events(world, "broken")
    assert any(e.get("reason") == "RankFailed" for e in world.events("broken"))
    print(f"\nkilled rank: kubectl apply -> Succeeded (two attempts) in {seconds:.1f}s")
