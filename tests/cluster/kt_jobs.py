"""The test cluster's Job controller (batch/v1, NonIndexed and Indexed), acting on the emulator in-process.

- creates pods from `spec.template` (labels `batch.kubernetes.io/job-name`, `controller-uid`, the owner
  reference, and the `batch.kubernetes.io/job-tracking` finalizer it removes once it has counted the pod);
- `parallelism`/`completions`; `Indexed` mode gives each pod its index (annotation, env `JOB_COMPLETION_INDEX`,
  hostname `<job>-<index>`);
- `suspend`: active pods are deleted (gracefully) and not counted as failures; the `Suspended` condition;
  unsuspending starts pods again;
- a failed pod goes through `podFailurePolicy` (first matching rule: `FailJob`, `Ignore`, `Count`;
  `onExitCodes` with `In`/`NotIn`, `onPodConditions` such as `DisruptionTarget`), then `backoffLimit`
  (the Job fails when counted failures exceed it); conditions `FailureTarget` + `Failed` (reasons
  `PodFailurePolicy`, `BackoffLimitExceeded`) or `SuccessCriteriaMet` + `Complete`; status counters
  `active`, `succeeded`, `failed`, `ready`, `startTime`, `completionTime`;
- no replacement pod while one is still terminating (podReplacementPolicy `Failed`);
- an optional exponential backoff before a replacement (`backoff_seconds`, doubled per failure, capped at 6 min).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from kt_emulator import KubeEmulator

TRACKING_FINALIZER = "batch.kubernetes.io/job-tracking"
TERMINAL = ("Succeeded", "Failed")


def now() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _container_exit_codes(pod: Mapping[str, Any], container: str | None) -> list[int]:
    codes = []
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        term = (status.get("state") or {}).get("terminated")
        if term is not None and (container is None or status.get("name") == container):
            codes.append(int(term.get("exitCode", 0)))
    return codes


def failure_action(pod: Mapping[str, Any], policy: Mapping[str, Any] | None) -> tuple[str, int | None]:
    """The podFailurePolicy action for a failed pod (`FailJob`, `Ignore`, `Count`) and the rule's index."""
    for index, rule in enumerate((policy or {}).get("rules") or []):
        if exits := rule.get("onExitCodes"):
            values = set(exits.get("values") or [])
            codes = _container_exit_codes(pod, exits.get("containerName"))
            if exits.get("operator") == "In":
                hit = any(c in values for c in codes)
            else:  # NotIn: exit code 0 never matches
                hit = any(c not in values and c != 0 for c in codes)
            if hit:
                return rule["action"], index
        for cond in rule.get("onPodConditions") or []:
            if any(c.get("type") == cond.get("type") and c.get("status") == cond.get("status", "True")
                   for c in (pod.get("status") or {}).get("conditions") or []):
                return rule["action"], index
    return "Count", None



class JobController:
    def __init__(self, api: KubeEmulator, backoff_seconds: float = 0.0) -> None:
        self.api = api
        self.backoff_seconds = backoff_seconds
        self.counted: set[str] = set()  # pods whose outcome is in the Job's status
        self.removed: set[str] = set()  # pods the Job controller deleted (suspend, a failed Job)

    async def sync(self) -> None:
        jobs = {j["metadata"]["uid"]: j for j in self.api.items("jobs")}
        pods = self.api.items("pods")
        for pod in pods:  # orphans (their Job is gone): release them
            owner = _controller_uid(pod)
            meta = pod["metadata"]
            if owner and owner not in jobs and TRACKING_FINALIZER in (meta.get("finalizers") or []) and \
                    ((pod.get("status") or {}).get("phase") in TERMINAL or not (pod.get("spec") or {}).get("nodeName")):
                await self._release(pod)
        for job in jobs.values():
            await self.sync_job(job, [p for p in pods if _controller_uid(p) == job["metadata"]["uid"]])

    async def sync_job(self, job: dict[str, Any], pods: list[dict[str, Any]]) -> None:
        meta, spec = job["metadata"], job.get("spec") or {}
        status = dict(job.get("status") or {})
        conditions = list(status.get("conditions") or [])
        finished = _has(conditions, "Complete") or _has(conditions, "Failed")
        patch: dict[str, Any] = {}
        succeeded, failed = int(status.get("succeeded", 0)), int(status.get("failed", 0))
        done_indexes = set(_parse_indexes(status.get("completedIndexes", "")))
        fail_job: str | None = None
        for pod in sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp", "")):
            phase = (pod.get("status") or {}).get("phase")
            uid = pod["metadata"]["uid"]
            if phase not in TERMINAL or uid in self.counted:
                continue
            if phase == "Succeeded":
                succeeded += 1
                index = (pod["metadata"].get("annotations") or {}).get("batch.kubernetes.io/job-completion-index")
                if index is not None:
                    done_indexes.add(int(index))
            else:
                action, rule = failure_action(pod, spec.get("podFailurePolicy"))
                if action == "FailJob" and fail_job is None:
                    codes = _container_exit_codes(pod, None)
                    fail_job = (f"Container {_first_failed_container(pod)} for pod {meta['namespace']}/"
                                f"{pod['metadata']['name']} failed with exit code {codes[0] if codes else '?'} "
                                f"matching FailJob rule at index {rule}")
                if action in ("Count", "FailJob") and uid not in self.removed:  # suspension is no failure
                    failed += 1
            self.counted.add(uid)
            await self._release(pod)
        active = [p for p in pods if (p.get("status") or {}).get("phase") not in TERMINAL
                  and not p["metadata"].get("deletionTimestamp")]
        completions = int(spec.get("completions") or 1)
        parallelism = int(spec.get("parallelism", 1) if spec.get("parallelism") is not None else 1)
        indexed = spec.get("completionMode") == "Indexed"
        patch.update(succeeded=succeeded, failed=failed)
        if indexed:
            patch["completedIndexes"] = _format_indexes(done_indexes)
        if not finished:
            if fail_job or failed > int(spec.get("backoffLimit", 6)):
                reason = "PodFailurePolicy" if fail_job else "BackoffLimitExceeded"
                message = fail_job or "Job has reached the specified backoff limit"
                conditions += [_condition("FailureTarget", reason, message), _condition("Failed", reason, message)]
                finished = True
                for pod in active:
                    self.removed.add(pod["metadata"]["uid"])
                    await self.api.remove_object("pods", meta["namespace"], pod["metadata"]["name"])
                active = []
            elif (len(done_indexes) if indexed else succeeded) >= completions:
                message = "Reached expected number of succeeded pods"
                conditions += [_condition("SuccessCriteriaMet", "CompletionsReached", message),
                               _condition("Complete", "CompletionsReached", message)]
                patch["completionTime"] = now()
                finished = True
            elif spec.get("suspend"):
                for pod in active:
                    self.removed.add(pod["metadata"]["uid"])
                    await self.api.remove_object("pods", meta["namespace"], pod["metadata"]["name"])
                active = []
                if not _has(conditions, "Suspended"):
                    conditions = [c for c in conditions if c.get("type") != "Suspended"]
                    conditions.append(_condition("Suspended", "JobSuspended", "Job suspended"))
            else:
                if _has(conditions, "Suspended"):
                    conditions = [{**c, "status": "False", "reason": "JobResumed", "message": "Job resumed",
                                   "lastTransitionTime": now()} if c.get("type") == "Suspended" else c
                                  for c in conditions]
                patch.setdefault("startTime", status.get("startTime") or now())
                terminating = [p for p in pods if p["metadata"].get("deletionTimestamp")
                               and (p.get("status") or {}).get("phase") not in TERMINAL]
                if not terminating:  # podReplacementPolicy TerminatingOrFailed: no replacement while one stops
                    if indexed:
                        busy = {int((p["metadata"].get("annotations") or {})
                                    .get("batch.kubernetes.io/job-completion-index", -1)) for p in active}
                        wanted = [i for i in range(completions) if i not in done_indexes and i not in busy]
                        for index in wanted[: max(0, parallelism - len(active))]:
                            active.append(await self._create_pod(job, index))
                    else:
                        want = min(parallelism, completions - succeeded) - len(active)
                        for _ in range(max(0, want)):
                            if failed and self.backoff_seconds:
                                await asyncio.sleep(min(self.backoff_seconds * 2 ** (failed - 1), 6 * 60))
                            active.append(await self._create_pod(job, None))
        patch["active"] = len(active)
        patch["ready"] = sum(1 for p in active if _has((p.get("status") or {}).get("conditions") or [], "Ready"))
        if conditions != list(status.get("conditions") or []):
            patch["conditions"] = conditions
        if any(status.get(k) != v for k, v in patch.items()):
            await self.api.patch_object("jobs", meta["namespace"], meta["name"], {"status": patch})

    async def _release(self, pod: Mapping[str, Any]) -> None:
        meta = pod["metadata"]
        rest = [f for f in meta.get("finalizers") or [] if f != TRACKING_FINALIZER]
        if len(rest) != len(meta.get("finalizers") or []):
            await self.api.patch_object("pods", meta["namespace"], meta["name"],
                                        {"metadata": {"finalizers": rest or None}})

    async def _create_pod(self, job: Mapping[str, Any], index: int | None) -> dict[str, Any]:
        meta = job["metadata"]
        template = (job.get("spec") or {}).get("template") or {}
        tmeta = template.get("metadata") or {}
        job_name, uid = meta["name"], meta["uid"]
        labels = {**(tmeta.get("labels") or {}), "batch.kubernetes.io/job-name": job_name, "job-name": job_name,
                  "batch.kubernetes.io/controller-uid": uid, "controller-uid": uid}
        annotations = dict(tmeta.get("annotations") or {})
        spec = dict(template.get("spec") or {})
        prefix = f"{job_name}-{index}-" if index is not None else f"{job_name}-"
        if index is not None:
            labels["batch.kubernetes.io/job-completion-index"] = str(index)
            annotations["batch.kubernetes.io/job-completion-index"] = str(index)
            spec.setdefault("hostname", f"{job_name}-{index}")
            spec["containers"] = [{**c, "env": [*(c.get("env") or []),
                                                {"name": "JOB_COMPLETION_INDEX", "value": str(index)}]}
                                  for c in spec.get("containers") or []]
        pod = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": prefix + uuid.uuid4().hex[:5], "namespace": meta["namespace"], "labels": labels,
                         "annotations": annotations, "finalizers": [TRACKING_FINALIZER],
                         "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": job_name, "uid": uid,
                                              "controller": True, "blockOwnerDeletion": True}]},
            "spec": spec,
            "status": {"phase": "Pending"},
        }
        return await self.api.put_object("pods", pod)


def _controller_uid(pod: Mapping[str, Any]) -> str | None:
    for ref in (pod.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller") and ref.get("kind") == "Job":
            return str(ref.get("uid"))
    return None


def _first_failed_container(pod: Mapping[str, Any]) -> str:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        term = (status.get("state") or {}).get("terminated") or {}
        if term.get("exitCode"):
            return str(status.get("name"))
    return "?"


def _has(conditions: Iterable[Mapping[str, Any]], ctype: str) -> bool:
    return any(c.get("type") == ctype and c.get("status") == "True" for c in conditions)


def _condition(ctype: str, reason: str, message: str) -> dict[str, Any]:
    stamp = now()
    return {"type": ctype, "status": "True", "reason": reason, "message": message, "lastProbeTime": stamp,
            "lastTransitionTime": stamp}


def _parse_indexes(text: str) -> list[int]:
    result: list[int] = []
    for part in (text or "").split(","):
        if "-" in part:
            lo, hi = part.split("-")
            result.extend(range(int(lo), int(hi) + 1))
        elif part:
            result.append(int(part))
    return result


def _format_indexes(indexes: Iterable[int]) -> str:
    ordered = sorted(set(indexes))
    parts: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)

