"""A GPU-planned trainer that finds no usable CUDA (issue 16, bug 3): the operator tells the trainer the plan's
device, the trainer exits 5 naming CUDA and the driver (tests/trainer/test_gpu_branches.py), and the operator
turns exit 5 into `Failed`, reason `GpuUnavailable`, with a Warning Event carrying the trainer's words."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

sys.path.insert(0, str(Path(__file__).parent))
from kt_cluster import NS, Cluster, finetunejob
from kubetune_operator import status as st
from kubetune_operator.reconcile import reconcile
from test_reconcile import RUNNING, after, body, pod, snapshot, trainer_job

from kubetune.contracts import ExitCode, Outcome, Reason, TerminationSummary
from kubetune.trainer_config import TrainerConfig

ERROR = ("the plan runs this job on L4, but CUDA is not usable here: torch 2.13.0 is built for CUDA 13.0, which "
         "needs an NVIDIA driver >= 580.65.06; found driver 535.104.05, 1 GPU(s) visible. Update the node's NVIDIA "
         "driver")
NO_GPU = TerminationSummary(outcome=Outcome.GPU_UNAVAILABLE, exit_code=5, error=ERROR).message()


@pytest.mark.parametrize(("code", "reason"), [
    (5, Reason.GPU_UNAVAILABLE), (2, Reason.TRAINING_FAILED), (4, Reason.TRAINING_FAILED),
    (1, Reason.TRAINING_FAILED), (None, Reason.TRAINING_FAILED)])
def test_failed_reason(code: int | None, reason: Reason) -> None:
    assert st.failed_reason(code) == reason


@pytest.mark.parametrize(("message", "expected"), [
    (NO_GPU, ERROR),
    ("", "no usable CUDA on its node (exit code 5): check the node's NVIDIA driver and device plugin"),
])
def test_exit_5_is_a_failed_attempt_with_the_trainers_words(message: str, expected: str) -> None:
    outcome = st.observe(trainer_job(), [pod(5, message=message)], 8000)
    assert (outcome.state, outcome.exit_code) == ("Failed", ExitCode.NO_GPU)
    assert expected in outcome.message


def test_reconcile_fails_the_job_as_gpu_unavailable_with_a_warning_event() -> None:
    snap = snapshot(body(), RUNNING, job=trainer_job("Failed"), pods=(pod(5, message=NO_GPU),))
    actions = reconcile(snap)
    status = after(snap, actions)
    assert status["phase"] == "Failed" and status["message"] == ERROR
    conditions = {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}
    assert conditions["Stalled"] == ("True", "GpuUnavailable")
    assert [(e.type, e.reason) for e in actions.events] == [("Warning", "GpuUnavailable")]
    assert not actions.create  # the same nodes would fail the same way: no new attempt


def test_trainer_config_device_bad_value_is_named() -> None:
    raw = {"job": {"name": "j"}, "spec": body()["spec"], "knobs": {"microBatchSize": 1,
           "gradientAccumulationSteps": 1, "gradientCheckpointing": True, "maxSeqLength": 512}, "device": "tpu"}
    with pytest.raises(ValidationError) as err:
        TrainerConfig.model_validate(raw)
    text = str(err.value)
    assert "device" in text and "'cuda'" in text and "'cpu'" in text


async def test_no_cuda_on_the_node_fails_the_job_with_the_driver_named(cluster: Cluster) -> None:
    await cluster.start_operator()
    await cluster.apply(finetunejob("nocuda"))
    await cluster.wait_phase("nocuda", "Queued")
    job = cluster.jobs()[0]
    config = cluster.api.read("configmaps", NS, job["metadata"]["name"]) or {}
    assert json.loads(config["data"]["job.json"])["device"] == "cuda"  # the plan's device reaches the trainer
    fail_at_once = job["spec"]["podFailurePolicy"]["rules"][0]
    assert fail_at_once["action"] == "FailJob" and ExitCode.NO_GPU in fail_at_once["onExitCodes"]["values"]
    running = await cluster.run_pod(job, "gpu-l4-1")
    await cluster.wait_phase("nocuda", "Running")
    await cluster.finish_job(job["metadata"]["name"], "Failed", "PodFailurePolicy")
    await cluster.end_pod(running, 5, NO_GPU)
    status = await cluster.wait_phase("nocuda", "Failed")
    assert status["message"] == ERROR
    conditions = {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}
    assert conditions["Stalled"] == ("True", "GpuUnavailable")
    warnings = [e for e in cluster.events("nocuda")
                if (e.get("type"), e.get("reason")) == ("Warning", "GpuUnavailable")]
    assert warnings and "driver 535.104.05" in warnings[0]["message"]
    assert len(cluster.jobs()) == 1
