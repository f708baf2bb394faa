"""status.serving, the ServingReady condition and the Warning Event, from the trainer's serving findings."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml
from kubetune_operator.reconcile import reconcile

from kubetune.contracts import Outcome, ServingFinding, TerminationSummary

sys.path.insert(0, str(Path(__file__).parent))
from test_reconcile import RUNNING, after, body, pod, snapshot, trainer_job

RANK = ServingFinding(rule="RankAboveMax", severity="Warning", message="LoRA rank 32 is above "
                      "spec.output.serving.maxLoraRank 16 (vLLM --max-lora-rank, default 16): vLLM refuses it.")


def finish(serving: list[ServingFinding] | None) -> tuple[dict[str, Any], Any]:
    done = TerminationSummary(outcome=Outcome.SUCCEEDED, exit_code=0, steps=5, total_steps=5,
                              adapter_uri="s3://adapters/j/adapter", serving=serving).message()
    snap = snapshot(body(), RUNNING, job=trainer_job(), pods=(pod(0, message=done),))
    actions = reconcile(snap)
    return after(snap, actions), actions


def condition(status: dict[str, Any], ctype: str) -> dict[str, Any] | None:
    return next((c for c in status["conditions"] if c["type"] == ctype), None)


def test_a_ready_adapter() -> None:
    status, actions = finish([])
    assert status["phase"] == "Succeeded"
    serving = status["serving"]
    assert serving["ready"] is True and serving["findings"] == []
    assert serving["adapterName"] == "j" and serving["adapterUri"] == "s3://adapters/j/adapter"
    manifest = yaml.safe_load(serving["kserve"])
    assert manifest["kind"] == "LLMInferenceService" and manifest["metadata"] == {
        "name": "j", "namespace": "ml", "labels": {"app.kubernetes.io/managed-by": "kubetune",
                                                   "kubetune.io/finetunejob": "j"}}
    assert manifest["spec"]["model"]["lora"]["adapters"] == [{"name": "j", "uri": "s3://adapters/j/adapter"}]
    assert manifest["spec"]["model"]["uri"] == "hf://meta-llama/Llama-3.1-8B-Instruct"
    assert "--enable-lora --max-lora-rank 16 --lora-modules j=/models/adapters/j" in serving["vllm"]
    assert serving["command"] == "kubetune serve-manifest j -n ml"
    ready = condition(status, "ServingReady")
    assert ready is not None and (ready["status"], ready["reason"]) == ("True", "ServingRulesMet")
    assert [e.reason for e in actions.events] == ["Succeeded"]


def test_a_broken_rule_is_a_warning_and_a_false_condition() -> None:
    status, actions = finish([RANK])
    assert status["phase"] == "Succeeded"  # the job did succeed: the adapter is there, for PEFT at least
    assert status["serving"]["ready"] is False and status["serving"]["findings"] == [RANK.model_dump()]
    ready = condition(status, "ServingReady")
    assert ready is not None and (ready["status"], ready["reason"]) == ("False", "ServingRulesBroken")
    assert "RankAboveMax: LoRA rank 32 is above spec.output.serving.maxLoraRank 16" in ready["message"]
    warning = [e for e in actions.events if e.reason == "ServingRulesBroken"]
    assert len(warning) == 1 and warning[0].type == "Warning"
    assert "kubetune serve-manifest j -n ml" in warning[0].message
    again = reconcile(snapshot(body(2), status, job=trainer_job(), pods=()))  # a spec edit after success
    assert [e.reason for e in again.events] == ["SpecChangeIgnored"]  # no second serving Warning
    assert condition(after(snapshot(body(2), status), again), "ServingReady") == ready  # kept as it was


def test_no_check_reported_gives_the_text_without_a_verdict() -> None:
    status, _ = finish(None)
    assert status["serving"]["ready"] is None
    assert condition(status, "ServingReady") is None
