"""Resident FineTuneJobs for bench/operator_scale.py: a platform's history, written straight into the emulator.

Each resident job is what the operator itself would have left behind: its FineTuneJob with the status the
operator wrote, its ConfigMap, its trainer Job and the Job's pod. One job per model is decided by the real
`reconcile()` (kubetune_operator.reconcile, the operator's pure decision function); the others are copies
with their own names and uids. Every tenth job is left Queued (Job created, pod Pending, never scheduled);
the others Succeeded (Job Complete, pod terminated with exit code 0).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from kt_emulator import KubeEmulator
from kubetune_operator import status as st
from kubetune_operator.reconcile import Snapshot, reconcile
from kubetune_operator.settings import Settings

from kubetune.planning.gpus import load_catalog
from kubetune.planning.placement import Inventory, node_info, supply_of
from kubetune.planning.plan import make_plan
from kubetune.sources import model_architecture

NOW = "2026-12-01T00:00:00Z"
QUEUED_EVERY = 10  # every tenth resident job is Queued, the rest Succeeded


def _snapshot(body: dict[str, Any], status: dict[str, Any], nodes: list[dict[str, Any]], job: Any = None,
              pods: tuple[dict[str, Any], ...] = ()) -> Snapshot:
    settings = Settings()
    catalog = load_catalog(settings.gpu_catalog, settings.provisionable_gpu_classes)
    inventory = Inventory(tuple(node_info(n) for n in nodes), {})
    supply = supply_of(inventory, catalog)

    def planner(spec: Any, above: str | None) -> Any:
        return make_plan(spec, model_architecture(spec.model.name, spec.model.source), catalog, above=above,
                         supply=supply)
    return Snapshot(body=body, status=status, trainer_job=job, pods=pods,
                    outcome=st.observe(job, pods, settings.trainer_port), inventory=inventory, catalog=catalog,
                    settings=settings, planner=planner, now=NOW)


def _pod(job: dict[str, Any], done: bool) -> dict[str, Any]:
    template = job["spec"]["template"]
    meta = job["metadata"]
    labels = {**(template.get("metadata") or {}).get("labels", {}), "batch.kubernetes.io/job-name": meta["name"]}
    state = {"terminated": {"exitCode": 0, "reason": "Completed", "message": ""}} if done else \
        {"waiting": {"reason": "ContainerCreating"}}
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": f"{meta['name']}-x1", "namespace": meta["namespace"], "labels": labels,
                     "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": meta["name"],
                                          "uid": meta["uid"], "controller": True}]},
        "spec": {**template["spec"], **({"nodeName": "gpu-l4-1"} if done else {})},
        "status": {"phase": "Succeeded" if done else "Pending",
                   "containerStatuses": [{"name": "trainer", "state": state}]},
    }


def template(body: dict[str, Any], nodes: list[dict[str, Any]], done: bool) -> list[tuple[str, dict[str, Any]]]:
    """(plural, object) for one resident job, in creation order; uids are placeholders (`UID-FTJ`, `UID-JOB`)."""
    ftj = {**body, "metadata": {**body["metadata"], "uid": "UID-FTJ", "generation": 1}}
    actions = reconcile(_snapshot(ftj, {}, nodes))
    status = dict(actions.status)
    config_map, job = actions.create[0], actions.create[1]
    job = {**job, "metadata": {**job["metadata"], "uid": "UID-JOB"}}
    if done:
        job["status"] = {"succeeded": 1, "completionTime": NOW, "conditions": [
            {"type": "SuccessCriteriaMet", "status": "True"}, {"type": "Complete", "status": "True"}]}
        pod = _pod(job, done)
        follow = reconcile(_snapshot(ftj, status, nodes, job, (pod,)))
        status = {k: v for k, v in {**status, **follow.status}.items() if v is not None}
    else:
        pod = _pod(job, done)
    return [("finetunejobs", {**ftj, "status": status}), ("configmaps", config_map), ("jobs", job), ("pods", pod)]


async def populate(api: KubeEmulator, jobs: list[dict[str, Any]], nodes: list[dict[str, Any]]) -> None:
    """Write every job's four objects into the emulator, with the uids the emulator gives them."""
    templates: dict[tuple[str, bool], list[tuple[str, dict[str, Any]]]] = {}
    for index, body in enumerate(jobs):
        done = index % QUEUED_EVERY != 0
        model = body["spec"]["model"]["name"]
        if (model, done) not in templates:
            templates[(model, done)] = template(body, nodes, done)
        first = templates[(model, done)]
        source = first[0][1]["metadata"]["name"]
        text = json.dumps(first).replace(source, body["metadata"]["name"])
        text = text.replace(first[0][1]["spec"]["dataset"]["source"], body["spec"]["dataset"]["source"])
        text = text.replace(first[0][1]["spec"]["output"]["uri"], body["spec"]["output"]["uri"])
        objects = json.loads(text)
        uids = {"UID-FTJ": str(uuid.uuid4()), "UID-JOB": str(uuid.uuid4())}
        for plural, obj in objects:
            stored = await api.put_object(plural, json.loads(_with_uids(json.dumps(obj), uids)))
            placeholder = "UID-FTJ" if plural == "finetunejobs" else "UID-JOB" if plural == "jobs" else None
            if placeholder:
                uids[placeholder] = stored["metadata"]["uid"]


def _with_uids(text: str, uids: dict[str, str]) -> str:
    for placeholder, uid in uids.items():
        text = text.replace(placeholder, uid)
    return text
