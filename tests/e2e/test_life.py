"""The whole life of a FineTuneJob, from `kubectl apply` to an adapter in S3, and what it survives.

Each test applies a FineTuneJob with the real kubectl; the real kopf operator plans it and creates the Job;
the test kubelet runs the real trainer process, which trains SmolLM2-135M (QLoRA NF4, CPU) for a few steps,
serves /status and /metrics, and writes checkpoints, the adapter and its manifest to moto's S3.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import pytest
import yaml
from kt_cluster import NS, eventually
from kt_life import CHECKPOINT_STEPS, MAX_STEPS, MODEL, World

from kubetune.planning.gpus import load_catalog

pytestmark = pytest.mark.slow

# The adapter of the uninterrupted run (test_whole_life), for the variants to compare with.
BASELINE: dict[str, Any] = {}
PROMPT = "What warranty do I get with my Aurora K2 kettle?"


def adapter_files(world: World, name: str) -> dict[str, bytes]:
    prefix = f"adapters/{name}/adapter/"
    listed = world.s3.list_objects_v2(Bucket=world.bucket, Prefix=prefix).get("Contents", [])
    return {o["Key"].removeprefix(prefix): world.s3.get_object(Bucket=world.bucket, Key=o["Key"])["Body"].read()
            for o in listed}


def adapter_tensors(files: dict[str, bytes]) -> dict[str, Any]:
    from safetensors.torch import load

    return dict(load(files["adapter_model.safetensors"]))


def check_manifest(files: dict[str, bytes]) -> dict[str, Any]:
    manifest = json.loads(files["manifest.json"])
    assert set(manifest["files"]) == set(files) - {"manifest.json"}
    for name, entry in manifest["files"].items():
        assert hashlib.sha256(files[name]).hexdigest() == entry["sha256"], name
        assert len(files[name]) == entry["bytes"], name
    return dict(manifest)


def assert_close(a: dict[str, Any], b: dict[str, Any], atol: float = 1e-4) -> None:
    import torch

    assert set(a) == set(b)
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst <= atol, f"adapters differ by up to {worst}"
    assert any(float(t.abs().sum()) > 0 for k, t in a.items() if "lora_B" in k)
    del torch


def node_matches(node: dict[str, Any], gpu_class: str) -> bool:
    labels = node["metadata"].get("labels") or {}
    klass = load_catalog().get(gpu_class, "status.plan.gpuClass")
    return any(all(labels.get(k) == v for k, v in want.items()) for want in klass.node_labels)


def events_cover_transitions(world: World, name: str) -> None:
    """An Event for every transition: each (phase, reason) the status went through has its Event."""
    transitions = []
    for status in world.history(name):
        reason = next((c.get("reason") for c in status.get("conditions") or [] if c.get("type") == "Ready"), None)
        if status.get("phase") and (status["phase"], reason) not in transitions:
            transitions.append((status["phase"], reason))
    reasons = {e.get("reason") for e in world.events(name)}
    missing = [t for t in transitions if t[1] not in reasons]
    assert not missing, f"no Event for {missing}; events: {sorted(r for r in reasons if r)}"


async def wait_events(world: World, name: str) -> None:
    await eventually(lambda: _covered(world, name), 15, f"an Event for every transition of {name}")


def _covered(world: World, name: str) -> bool:
    try:
        events_cover_transitions(world, name)
    except AssertionError:
        return False
    return True


async def test_whole_life(world: World) -> None:
    started = time.perf_counter()
    world.watch_trainer()
    await world.apply("life", evaluation={"prompts": [PROMPT], "maxNewTokens": 12})
    done = await world.wait_phase("life", "Succeeded")
    seconds = time.perf_counter() - started

    # Planned and placed: the one Job ran its pod on a node of the planned class.
    [job] = world.jobs("life")
    pods = world.pods_seen({job["metadata"]["name"]})
    assert len(pods) == 1, list(pods)
    [pod] = pods.values()
    node = world.cluster.api.read("nodes", None, pod["spec"]["nodeName"])
    assert node is not None and node_matches(node, done["plan"]["gpuClass"]), (pod["spec"]["nodeName"], done["plan"])
    term = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 0 and json.loads(term["message"])["outcome"] == "Succeeded"

    # Running with step, ETA and loss on the way; then Succeeded with the adapter URI.
    running = [s for s in world.history("life") if s.get("phase") == "Running" and (s.get("progress") or {}).get(
        "step")]
    assert running, [s.get("phase") for s in world.history("life")]
    progress = running[-1]["progress"]
    assert progress["totalSteps"] == MAX_STEPS and 1 <= progress["step"] <= MAX_STEPS
    assert progress["percent"] == 100 * progress["step"] // MAX_STEPS
    assert progress["loss"] > 0 and progress["etaSeconds"] is not None and running[-1]["loss"]
    assert running[-1]["step"] == f"{progress['step']}/{MAX_STEPS}"
    assert done["adapterUri"] == f"s3://{world.bucket}/adapters/life/adapter"
    assert done["modelCommit"] == world.hub.repos[MODEL].refs["main"]  # the commit sha of the base model
    fetched = world.hub.file_downloads(MODEL)
    assert "model.safetensors" in fetched and not [f for f in fetched if f.endswith((".pth", ".gguf", ".onnx"))]
    assert done["progress"]["step"] == MAX_STEPS and done["progress"]["percent"] == 100
    assert done["attempts"][0]["resumedFromStep"] == 0
    await wait_events(world, "life")

    # The trainer served /status and /metrics on the pod's IP and port.
    assert any(json.loads(s).get("step") for s in world.served.get("/status", [])), world.served.keys()
    assert any("kubetune_" in m for m in world.served.get("/metrics", []))

    # Checkpoints went to S3 on the way; adapter files match the manifest's sha256s.
    log = world.trainer_log(pod["metadata"]["name"])
    assert '"event": "checkpoint"' in log and f"checkpoints/step-{CHECKPOINT_STEPS:08d}" in log
    files = adapter_files(world, "life")
    manifest = check_manifest(files)
    assert manifest["metrics"]["steps"] == MAX_STEPS
    assert manifest["baseModel"]["commit"] == world.hub.repos[MODEL].refs["main"]

    # Ready to serve: every serving rule met, and the KServe / vLLM text for this adapter in status.serving.
    assert manifest["serving"] == []
    serving = done["serving"]
    assert serving["ready"] is True and serving["adapterUri"] == done["adapterUri"]
    ready = next(c for c in done["conditions"] if c["type"] == "ServingReady")
    assert (ready["status"], ready["reason"]) == ("True", "ServingRulesMet")
    kserve = yaml.safe_load(serving["kserve"])
    assert kserve["kind"] == "LLMInferenceService"
    assert kserve["spec"]["model"]["lora"]["adapters"] == [{"name": "life", "uri": done["adapterUri"]}]
    assert "--enable-lora --max-lora-rank 16 --lora-modules life=" in serving["vllm"]
    await check_evaluation(world, "life", manifest, done)
    print(f"\nwhole life: kubectl apply -> Succeeded in {seconds:.1f}s; the pod (cold model cache) ran "
          f"{world.pod_seconds(pod['metadata']['name']):.1f}s")


async def check_evaluation(world: World, name: str, manifest: dict[str, Any], done: dict[str, Any]) -> None:
    """spec.evaluation end to end: eval.json in S3 (sha256 in the manifest), status.result, the Evaluated Event,
    and `kubectl describe` showing the result."""
    blob = world.s3.get_object(Bucket=world.bucket, Key=f"adapters/{name}/eval.json")["Body"].read()
    entry = manifest["evaluation"]["files"]["eval.json"]
    assert hashlib.sha256(blob).hexdigest() == entry["sha256"] and len(blob) == entry["bytes"]
    document = json.loads(blob)
    held = document["heldOut"]
    assert held["rows"] >= 1 and held["tokens"] > 0 and held["base"]["loss"] > 0 and held["adapter"]["loss"] > 0
    [said] = document["answers"]
    assert said["prompt"] == PROMPT and said["base"] and said["adapter"]
    result = done["result"]
    assert (result["baseLoss"], result["adapterLoss"], result["rows"]) == (
        held["base"]["loss"], held["adapter"]["loss"], held["rows"])
    assert result["summary"].startswith(f"held-out loss {held['base']['loss']:.3f} -> {held['adapter']['loss']:.3f}")
    assert result["evalUri"] == f"s3://{world.bucket}/adapters/{name}/eval.json"
    assert result["answers"][0]["prompt"] == PROMPT
    await eventually(lambda: [e for e in world.events(name) if e.get("reason") == "Evaluated"], 15,
                     "the Evaluated Event")
    [told] = [e for e in world.events(name) if e.get("reason") == "Evaluated"]
    assert told["type"] == "Normal" and told["message"].startswith("Evaluated: " + result["summary"])
    described = await world.kubectl("describe", "ftj", name)
    assert described.code == 0, described
    assert "Result:" in described.out and "Adapter Loss:" in described.out and "Evaluated" in described.out, \
        described.out
    print(f"\n$ kubectl describe ftj {name}\n{described.out}")  # what a user sees (pytest -s shows it)


@pytest.mark.parametrize("model", ["tiny"], indirect=True)
async def test_sigkill_and_operator_restart_mid_run(world: World) -> None:
    """The trainer is SIGKILLed while the operator is down: the Job controller's next pod resumes from the last
    complete checkpoint; the restarted operator adopts the Job (no duplicate) and sees the job through, to the
    adapter of an uninterrupted twin."""
    killed_once: list[str] = []

    def first_pod(pod: dict[str, Any]) -> bool:
        """Only the first pod dies without a word: before step 3, after the step-2 checkpoint."""
        if killed_once or not pod["metadata"]["name"].startswith("killed-a1-"):
            return False
        killed_once.append(pod["metadata"]["name"])
        return True

    world.kubelet.inject_env(first_pod, {"KUBETUNE_FAULT_KILL_AT_STEP": str(CHECKPOINT_STEPS + 1)})
    await world.apply("killed")
    await world.apply("straight")
    await world.wait_phase("killed", "Running")
    [operator] = world.cluster.operators
    await operator.stop()
    world.cluster.operators.clear()
    [job] = world.jobs("killed")
    await eventually(lambda: len(world.pods_seen({job["metadata"]["name"]})) == 2, 120, "a replacement pod")
    await world.start_operator()

    done = await world.wait_phase("killed", "Succeeded")
    assert len(world.jobs("killed")) == 1 and world.cluster.api.request_count("POST", "jobs") == 2  # no duplicate
    pods = world.pods_seen({job["metadata"]["name"]})
    assert len(pods) == 2
    [victim] = killed_once
    first = pods[victim]["status"]["containerStatuses"][0]["state"]["terminated"]
    assert first["exitCode"] == 137
    [second] = [p for n, p in pods.items() if n != victim]
    log = world.trainer_log(second["metadata"]["name"])
    assert f"at step {CHECKPOINT_STEPS}/{MAX_STEPS}" in log, log[-3000:]  # resumed, not from step 0
    assert done["progress"]["step"] == MAX_STEPS
    assert [(a["outcome"], a.get("resumedFromStep")) for a in done["attempts"]] == [("Succeeded", CHECKPOINT_STEPS)]
    files = adapter_files(world, "killed")
    check_manifest(files)
    await world.wait_phase("straight", "Succeeded")
    assert_close(adapter_tensors(files), adapter_tensors(adapter_files(world, "straight")))
    await wait_events(world, "killed")


@pytest.mark.parametrize("model", ["tiny"], indirect=True)
async def test_out_of_memory_escalates_and_resumes(world: World) -> None:
    world.kubelet.inject_env(lambda pod: pod["metadata"]["name"].startswith("oom-a1-"),
                             {"KUBETUNE_FAULT_OOM_AT_STEP": str(CHECKPOINT_STEPS + 1)})
    # The cheapest serving-rule variant rides along: r 8 above a maxLoraRank of 1 (the adapter is fine for PEFT).
    await world.apply("oom", serving={"maxLoraRank": 1})
    done = await world.wait_phase("oom", "Succeeded")
    await eventually(lambda: any(e.get("reason") == "ServingRulesBroken" for e in world.events("oom")), 15,
                     "the serving Warning Event")
    [warning] = [e for e in world.events("oom") if e.get("reason") == "ServingRulesBroken"]
    assert warning["type"] == "Warning" and "RankAboveMax: LoRA rank 8 is above" in warning["message"]
    served = next(c for c in world.ftj("oom")["status"]["conditions"] if c["type"] == "ServingReady")
    assert (served["status"], served["reason"]) == ("False", "ServingRulesBroken")
    assert world.ftj("oom")["status"]["serving"]["ready"] is False
    attempts = done["attempts"]
    assert [a["outcome"] for a in attempts] == ["OutOfMemory", "Succeeded"], attempts
    catalog = load_catalog()
    first, second = (catalog.get(a["gpuClass"], "gpuClass") for a in attempts)
    assert second.memory_bytes > first.memory_bytes  # one class up
    jobs = {j["metadata"]["name"]: j for j in world.jobs("oom")}
    assert len(jobs) == 2
    pods = world.pods_seen(set(jobs))
    assert len(pods) == 2
    [late] = [p for p in pods.values() if not p["metadata"]["name"].startswith("oom-a1-")]
    node = world.cluster.api.read("nodes", None, late["spec"]["nodeName"])
    assert node is not None and node_matches(node, second.name)
    log = world.trainer_log(late["metadata"]["name"])
    assert f"at step {CHECKPOINT_STEPS}/{MAX_STEPS}" in log, log[-3000:]  # resumed from the checkpoint
    # The model cache PVC outlives the attempt: the second attempt downloads nothing.
    weights = [f for f in world.hub.file_downloads(world.model["name"]) if f.endswith(".safetensors")]
    assert weights == ["model.safetensors"], weights
    print(f"\nsecond attempt on a cache hit (0 files downloaded): its pod ran "
          f"{world.pod_seconds(late['metadata']['name']):.1f}s")
    resumed = [a.get("resumedFromStep") for a in attempts]
    assert resumed == [0, CHECKPOINT_STEPS], attempts
    check_manifest(adapter_files(world, "oom"))
    await wait_events(world, "oom")
    assert any(e.get("reason") == "OutOfMemoryEscalated" for e in world.events("oom"))


@pytest.mark.parametrize("model", ["tiny"], indirect=True)
async def test_deleted_mid_run(world: World) -> None:
    await world.apply("gone", maxSteps=1000)  # minutes of tiny steps; it stops at the first checkpoint after SIGTERM
    await world.wait_phase("gone", "Running")
    await world.wait_checkpoint("gone", CHECKPOINT_STEPS)
    [job] = world.jobs("gone")
    [pod] = world.pods_seen({job["metadata"]["name"]})
    deleted = await world.kubectl("delete", "ftj", "gone", "--wait=false")
    assert deleted.code == 0, deleted

    def stopped() -> dict[str, Any] | None:
        last = world.pods_seen({job["metadata"]["name"]})[pod]
        return last if world.cluster.api.read("pods", NS, pod) is None else None
    last = await eventually(stopped, 120, "the trainer pod to stop and go")
    term = last["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 143, term  # SIGTERM: it checkpointed and exited
    assert "received SIGTERM" in world.trainer_log(pod)
    assert world.cluster.api.items("jobs", NS) == [] and world.cluster.api.items("configmaps", NS) == []
    keys = [o["Key"] for o in world.s3.list_objects_v2(Bucket=world.bucket, Prefix="adapters/gone/")["Contents"]]
    assert any(k.endswith("/COMPLETE") for k in keys)  # the S3 output is kept

