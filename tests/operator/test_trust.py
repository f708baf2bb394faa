"""Issue 11 finding 8: a pod that only looks like a trainer pod is not believed.

A tenant who may create pods in the namespace copies the trainer pod's labels: it claims success with an
adapter URI of its choosing, or serves a /status the operator would poll. The operator believes only the
pods its own trainer Job controls (ownerReference uid), and only a Job its FineTuneJob controls.
"""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest
from kt_cluster import NS, Cluster, eventually, finetunejob
from kubetune_operator.trust import controlled_by, trusted_job, trusted_pods

from kubetune.contracts import Outcome, TerminationSummary

JOB = {"metadata": {"name": "run-a1", "uid": "job-uid"}}


def pod(owner: dict[str, Any] | None) -> dict[str, Any]:
    return {"metadata": {"name": "p", "ownerReferences": [owner] if owner else []}}


@pytest.mark.parametrize(("owner", "trusted"), [
    ({"apiVersion": "batch/v1", "kind": "Job", "name": "run-a1", "uid": "job-uid", "controller": True}, True),
    (None, False),
    ({"apiVersion": "batch/v1", "kind": "Job", "name": "run-a1", "uid": "other-uid", "controller": True}, False),
    ({"apiVersion": "batch/v1", "kind": "Job", "name": "run-a1", "uid": "job-uid"}, False),  # not the controller
    ({"apiVersion": "batch/v1", "kind": "Job", "name": "run-a1", "uid": "job-uid", "controller": "true"}, False),
    ({"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "run-a1", "uid": "job-uid", "controller": True}, False),
])
def test_only_pods_the_job_controls_are_trusted(owner: dict[str, Any] | None, trusted: bool) -> None:
    assert (trusted_pods(JOB, [pod(owner)]) != ()) is trusted
    assert trusted_pods(None, [pod(owner)]) == ()


def test_only_a_job_the_finetunejob_controls_is_trusted() -> None:
    job = {"metadata": {"ownerReferences": [{"kind": "FineTuneJob", "uid": "ftj-uid", "controller": True}]}}
    assert trusted_job(job, "ftj-uid") is job
    assert trusted_job(job, "someone-else") is None and trusted_job(None, "ftj-uid") is None
    assert not controlled_by(job, "FineTuneJob", None) and not controlled_by({}, "FineTuneJob", "ftj-uid")


def forged(real_job: dict[str, Any], name: str, **status: Any) -> dict[str, Any]:
    template = real_job["spec"]["template"]
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NS, "labels": copy.deepcopy(template["metadata"]["labels"]),
                         "annotations": dict(template["metadata"]["annotations"])},
            "spec": {**copy.deepcopy(template["spec"]), "nodeName": "cpu-1"}, "status": status}


async def test_a_forged_pod_cannot_finish_a_job_or_feed_it_progress(cluster: Cluster,
                                                                     trainer_standin: tuple[int, dict]) -> None:
    port, _ = trainer_standin
    await cluster.start_operator()
    await cluster.apply(finetunejob("run"))
    await cluster.wait_phase("run", "Queued")
    [job] = cluster.jobs()

    lie = TerminationSummary(outcome=Outcome.SUCCEEDED, exit_code=0, steps=500, adapter_uri="s3://attacker/adapter/")
    done = forged(job, "run-a1-forged", phase="Succeeded", containerStatuses=[
        {"name": "trainer", "ready": False, "restartCount": 0, "state": {"terminated": {
            "exitCode": 0, "reason": "Completed", "message": lie.message(), "finishedAt": "2026-11-30T08:10:00Z"}}}])
    running = forged(job, "run-a1-forged-status", phase="Running", podIP="127.0.0.1", containerStatuses=[
        {"name": "trainer", "ready": True, "restartCount": 0, "state": {"running": {}}}])
    running["metadata"]["annotations"]["prometheus.io/port"] = str(port)  # the standin serves step 120
    running["metadata"]["ownerReferences"] = [{"apiVersion": "batch/v1", "kind": "Job", "name": "run-a1",
                                               "uid": "not-the-jobs-uid", "controller": True}]
    await cluster.api.put_object("pods", done)
    await cluster.api.put_object("pods", running)
    await asyncio.sleep(2.0)  # several sweeps (poll interval 0.3 s)
    status = cluster.status("run")
    assert status.get("phase") != "Succeeded" and status.get("adapterUri") is None
    assert not status.get("step"), status  # the forged /status was never polled

    real = await cluster.run_pod(job, "gpu-l4-1", port=port)  # the Job controller's pod is believed
    await eventually(lambda: cluster.status("run").get("step") == "120/500")
    truth = TerminationSummary(outcome=Outcome.SUCCEEDED, exit_code=0, steps=500,
                               adapter_uri="s3://adapters/run/adapter/")
    await cluster.end_pod(real, 0, truth.message())
    status = await cluster.wait_phase("run", "Succeeded")
    assert status["adapterUri"] == "s3://adapters/run/adapter/"
