"""What the operator's indexes keep of each watched object: the fields a decision reads, nothing else.

kopf hands every indexer the whole object; the indexes hold what the indexer returns for as long as the
object exists, so at platform scale (thousands of finished FineTuneJobs kept as records, each with its Job and
pod) whatever is copied here is the operator's memory. Dropped: `metadata.managedFields`, annotations nobody
reads (kubectl's `last-applied-configuration` is a second copy of the spec), a Job's pod template, a pod's
spec (containers, env, volumes), and the details of a finished FineTuneJob's status. Each function lists what
it keeps; the readers are status.observe, trust, scaleout.jobset_job_names and reconcile.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kubetune import wire
from kubetune.contracts import TERMINAL_PHASES

_META = ("name", "namespace", "uid", "generation", "labels", "ownerReferences", "creationTimestamp",
         "deletionTimestamp")
POD_ANNOTATIONS = ("jobset.sigs.k8s.io/job-index", "batch.kubernetes.io/job-completion-index", wire.PROMETHEUS_PORT)
_JOB_SPEC = ("suspend", "completions", "completionMode", "parallelism")
SETTLED_STATUS = ("phase", "observedGeneration", "jobName")  # a finished FineTuneJob's status, as indexed


def metadata(body: Mapping[str, Any], annotations: tuple[str, ...] = ()) -> dict[str, Any]:
    meta = body.get("metadata") or {}
    kept = {key: meta[key] for key in _META if meta.get(key) is not None}
    notes = {key: value for key, value in (meta.get("annotations") or {}).items() if key in annotations}
    if notes:
        kept["annotations"] = notes
    return kept


def _head(body: Mapping[str, Any]) -> dict[str, Any]:
    return {"apiVersion": body.get("apiVersion"), "kind": body.get("kind")}


def settled(status: Mapping[str, Any], generation: Any) -> bool:
    """A finished FineTuneJob whose spec has not changed since: nothing for the operator to decide or follow."""
    return status.get("phase") in TERMINAL_PHASES and status.get("observedGeneration") == generation


def finetunejob(body: Mapping[str, Any]) -> dict[str, Any]:
    """Metadata, spec, status; a settled job's status only as far as `settled()` and the pod/Job handlers
    read it (its phase, observedGeneration and jobName)."""
    meta = metadata(body)
    status = dict(body.get("status") or {})
    if settled(status, meta.get("generation")):
        status = {key: status[key] for key in SETTLED_STATUS if key in status}
    return {**_head(body), "metadata": meta, "spec": body.get("spec"), "status": status}


def workload(body: Mapping[str, Any]) -> dict[str, Any]:
    """A trainer Job or JobSet: owner, suspend and gang size from the spec (a JobSet's replicated Jobs by name,
    replicas and parallelism), its status whole (conditions and counts)."""
    spec = body.get("spec") or {}
    kept = {key: spec[key] for key in _JOB_SPEC if key in spec}
    if "replicatedJobs" in spec:
        kept["replicatedJobs"] = [
            {"name": r.get("name"), "replicas": r.get("replicas"),
             "template": {"spec": {"parallelism": ((r.get("template") or {}).get("spec") or {}).get("parallelism")}}}
            for r in spec.get("replicatedJobs") or []]
    return {**_head(body), "metadata": metadata(body), "spec": kept, "status": body.get("status") or {}}


def pod(body: Mapping[str, Any]) -> dict[str, Any]:
    """A trainer pod: its node, phase, IP, the trainer container's state (exit code and termination message),
    and the annotations that say its rank and metrics port."""
    status = body.get("status") or {}
    containers = [{"name": c.get("name"), "state": c.get("state")} for c in status.get("containerStatuses") or []]
    return {**_head(body), "metadata": metadata(body, POD_ANNOTATIONS),
            "spec": {"nodeName": (body.get("spec") or {}).get("nodeName")},
            "status": {"phase": status.get("phase"), "podIP": status.get("podIP"), "containerStatuses": containers}}
