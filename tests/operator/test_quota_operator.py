"""Quotas at the operator: what `kubectl apply` brings waits Pending (QuotaExceeded, a Warning Event) until the
namespace's quota (kubetune.quota, the same decision the API makes at submit) admits its plan."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml
from kt_cluster import NS, Cluster, eventually, finetunejob
from kubetune_operator.reconcile import reconcile
from test_reconcile import body, settle, snapshot

from kubetune.quota import Limits, Usage

CASES: list[tuple[Limits | None, Usage, str, str | None, str | None]] = [
    # (the namespace's quota, what its other jobs hold, phase, reason, the limit the message names)
    (None, Usage(9, 9), "Queued", "JobCreated", None),
    (Limits(max_concurrent_jobs=2, max_gpus=2, allowed_gpu_classes=("L4",)), Usage(1, 1), "Queued", "JobCreated",
     None),
    (Limits(allowed_gpu_classes=("A100-80GB",)), Usage(), "Pending", "QuotaExceeded", "allowedGpuClasses"),
    (Limits(max_estimated_cost=0.5), Usage(), "Pending", "QuotaExceeded", "maxEstimatedCost"),
    (Limits(max_concurrent_jobs=1), Usage(1, 1), "Pending", "QuotaExceeded", "maxConcurrentJobs"),
    (Limits(max_gpus=1), Usage(1, 1), "Pending", "QuotaExceeded", "maxGpus"),
]


@pytest.mark.parametrize(("limits", "usage", "phase", "reason", "named"), CASES)
def test_the_first_launch_obeys_the_quota(limits: Limits | None, usage: Usage, phase: str, reason: str,
                                          named: str | None) -> None:
    snap = snapshot(body(training={"maxSteps": 500}), quota=limits, usage=usage)
    actions = reconcile(snap)
    status = actions.status
    assert status["phase"] == phase
    assert next(c for c in status["conditions"] if c["type"] == "Ready")["reason"] == reason
    [event] = actions.events
    if named:
        assert actions.create == [] and "jobName" not in status
        assert event.type == "Warning" and event.reason.value == "QuotaExceeded"
        assert status["message"].startswith(f"namespace ml: quota {named} is ")
        assert status["plan"]["gpuClass"] == "L4"  # the plan it waits with is shown
    else:
        assert [c["kind"] for c in actions.create] == ["ConfigMap", "Job"]


def test_a_waiting_job_launches_once_there_is_room_and_warns_once() -> None:
    full = Limits(max_concurrent_jobs=1)
    waiting = settle(snapshot(body(), quota=full, usage=Usage(1, 1)))
    again = reconcile(snapshot(body(), waiting, quota=full, usage=Usage(1, 1)))  # the timer, still full
    assert again.events == [] and again.create == []
    room = reconcile(snapshot(body(), waiting, quota=full, usage=Usage(0, 0)))
    assert room.status["phase"] == "Queued" and [c["kind"] for c in room.create] == ["ConfigMap", "Job"]


async def test_kubectl_apply_cannot_go_around_the_quota(cluster: Cluster, tmp_path: Path) -> None:
    quotas = tmp_path / "quotas.yaml"
    quotas.write_text(yaml.safe_dump({"namespaces": {NS: {"maxConcurrentJobs": 1}}}))
    await cluster.start_operator(quotas_file=str(quotas))
    await cluster.apply(finetunejob("first"))
    await cluster.wait_phase("first", "Queued")
    await cluster.apply(finetunejob("second"))
    status = await cluster.wait_phase("second", "Pending")
    assert "quota maxConcurrentJobs is 1; 1 FineTuneJobs are already queued or running" in status["message"]

    def warned() -> list[dict[str, Any]]:
        return [e for e in cluster.events("second") if e["reason"] == "QuotaExceeded" and e["type"] == "Warning"]

    await eventually(warned, 5, "a QuotaExceeded Warning Event")
    assert [j["metadata"]["name"] for j in cluster.jobs()] == ["first-a1"]

    path = f"/apis/kubetune.io/v1alpha1/namespaces/{NS}/finetunejobs/first"
    await cluster.request("PATCH", path, {"spec": {"suspend": True}}, "application/merge-patch+json")
    await cluster.wait_phase("first", "Suspended")  # a suspended job holds no GPU: the next one may go
    await cluster.wait_phase("second", "Queued")
    assert sorted(j["metadata"]["name"] for j in cluster.jobs()) == ["first-a1", "second-a1"]


async def test_jobs_applied_at_once_are_admitted_one_at_a_time(cluster: Cluster, tmp_path: Path) -> None:
    quotas = tmp_path / "quotas.yaml"
    quotas.write_text(yaml.safe_dump({"default": {"maxConcurrentJobs": 1}}))
    await cluster.start_operator(quotas_file=str(quotas))
    names = [f"burst-{i}" for i in range(4)]
    for name in names:
        await cluster.apply(finetunejob(name))

    def decided() -> list[str] | None:
        phases = [cluster.status(n).get("phase") for n in names]
        return phases if None not in phases else None

    phases = await eventually(decided, 15, "a phase on every job")
    await asyncio.sleep(1)  # a few more polls: still one
    phases = [cluster.status(n).get("phase") for n in names]
    assert sorted(phases) == ["Pending", "Pending", "Pending", "Queued"], phases
    assert len(cluster.jobs()) == 1


async def test_a_restarted_operator_counts_the_jobs_it_finds_against_the_quota(cluster: Cluster,
                                                                               tmp_path: Path) -> None:
    """What a namespace holds after a restart comes from the watch alone (the new operator wrote nothing yet)."""
    quotas = tmp_path / "quotas.yaml"
    quotas.write_text(yaml.safe_dump({"default": {"maxConcurrentJobs": 1}}))
    first = await cluster.start_operator(quotas_file=str(quotas))
    await cluster.apply(finetunejob("first"))
    await cluster.wait_phase("first", "Queued")
    await first.stop()
    await cluster.start_operator(quotas_file=str(quotas))
    await cluster.apply(finetunejob("second"))
    status = await cluster.wait_phase("second", "Pending")
    assert "quota maxConcurrentJobs is 1; 1 FineTuneJobs are already queued or running" in status["message"]
    assert [j["metadata"]["name"] for j in cluster.jobs()] == ["first-a1"]
