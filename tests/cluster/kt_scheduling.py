"""The test cluster's scheduler: a pending pod goes to the first Ready node (by name) that satisfies its
`nodeSelector` and required node affinity (`In`, `NotIn`, `Exists`, `DoesNotExist`, `Gt`, `Lt`), whose
`NoSchedule`/`NoExecute` taints it tolerates, and that has the extended resources it asks for
(`nvidia.com/gpu`, counted over the node's non-terminal pods); otherwise `PodScheduled=False`, reason
`Unschedulable`, with kube-scheduler's kind of message ("0/5 nodes are available: ...").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from kt_emulator import KubeEmulator
from kt_jobs import TERMINAL, now

GPU = "nvidia.com/gpu"


def _expression_matches(expr: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    key, op, values = expr["key"], expr["operator"], list(expr.get("values") or [])
    value = labels.get(key)
    if op == "In":
        return value in values
    if op == "NotIn":
        return value not in values
    if op == "Exists":
        return key in labels
    if op == "DoesNotExist":
        return key not in labels
    if op in ("Gt", "Lt"):
        try:
            number, bound = int(value or ""), int(values[0])
        except (ValueError, IndexError):
            return False
        return number > bound if op == "Gt" else number < bound
    raise ValueError(f"node selector operator {op!r}: allowed In, NotIn, Exists, DoesNotExist, Gt, Lt")


def _tolerated(taint: Mapping[str, Any], tolerations: Iterable[Mapping[str, Any]]) -> bool:
    for tol in tolerations:
        if tol.get("effect") and tol["effect"] != taint.get("effect"):
            continue
        if tol.get("operator", "Equal") == "Exists":
            if not tol.get("key") or tol["key"] == taint.get("key"):
                return True
        elif tol.get("key") == taint.get("key") and tol.get("value", "") == taint.get("value", ""):
            return True
    return False


def pod_requests(pod: Mapping[str, Any], resource: str) -> int:
    total = 0
    for container in (pod.get("spec") or {}).get("containers") or []:
        res = container.get("resources") or {}
        value = (res.get("requests") or {}).get(resource, (res.get("limits") or {}).get(resource, 0))
        total += int(value)
    return total


def unfit_reason(pod: Mapping[str, Any], node: Mapping[str, Any],
                 pods_on_node: Iterable[Mapping[str, Any]]) -> str | None:
    """Why `pod` cannot go on `node` (None: it fits)."""
    spec = pod.get("spec") or {}
    labels = (node.get("metadata") or {}).get("labels") or {}
    if not any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (node.get("status") or {}).get("conditions") or []):
        return "node(s) were not ready"
    if any(labels.get(k) != v for k, v in (spec.get("nodeSelector") or {}).items()):
        return "node(s) didn't match Pod's node affinity/selector"
    required = ((((spec.get("affinity") or {}).get("nodeAffinity") or {})
                 .get("requiredDuringSchedulingIgnoredDuringExecution") or {}).get("nodeSelectorTerms"))
    if required and not any(all(_expression_matches(e, labels) for e in term.get("matchExpressions") or [])
                            for term in required):
        return "node(s) didn't match Pod's node affinity/selector"
    for taint in (node.get("spec") or {}).get("taints") or []:
        if taint.get("effect") in ("NoSchedule", "NoExecute") and not _tolerated(taint, spec.get("tolerations") or []):
            return f"node(s) had untolerated taint {{{taint.get('key')}: {taint.get('value', '')}}}"
    want = pod_requests(pod, GPU)
    if want:
        allocatable = int(((node.get("status") or {}).get("allocatable") or {}).get(GPU, 0))
        used = sum(pod_requests(p, GPU) for p in pods_on_node
                   if (p.get("status") or {}).get("phase") not in TERMINAL)
        if used + want > allocatable:
            return f"Insufficient {GPU}"
    return None


def schedule(pod: Mapping[str, Any], nodes: Iterable[Mapping[str, Any]],
             pods: Iterable[Mapping[str, Any]]) -> tuple[str | None, str]:
    """(node name, "") or (None, the scheduler's message)."""
    pods = list(pods)
    reasons: dict[str, int] = {}
    nodes = list(nodes)
    for node in sorted(nodes, key=lambda n: n["metadata"]["name"]):
        name = node["metadata"]["name"]
        why = unfit_reason(pod, node, [p for p in pods if (p.get("spec") or {}).get("nodeName") == name])
        if why is None:
            return name, ""
        reasons[why] = reasons.get(why, 0) + 1
    detail = ", ".join(f"{n} {why}" for why, n in sorted(reasons.items()))
    return None, f"0/{len(nodes)} nodes are available: {detail}." if nodes else "0/0 nodes are available."


async def sync_scheduler(api: KubeEmulator) -> None:
    """Bind every pending pod that fits somewhere; say why on those that fit nowhere."""
    pods = api.items("pods")
    nodes = api.items("nodes")
    for pod in pods:
        if (pod.get("spec") or {}).get("nodeName") or pod["metadata"].get("deletionTimestamp") or \
                (pod.get("status") or {}).get("phase") in TERMINAL:
            continue
        node, message = schedule(pod, nodes, pods)
        meta = pod["metadata"]
        if node is None:
            cond = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}
            old = [c for c in (pod.get("status") or {}).get("conditions") or [] if c.get("type") == "PodScheduled"]
            if not old or {k: old[0].get(k) for k in cond} != cond:
                await api.patch_object("pods", meta["namespace"], meta["name"], {"status": {
                    "conditions": [{**cond, "lastTransitionTime": now()}]}})
            continue
        await api.patch_object("pods", meta["namespace"], meta["name"], {
            "spec": {"nodeName": node},
            "status": {"conditions": [{"type": "PodScheduled", "status": "True", "lastTransitionTime": now()}]},
        })
        pod["spec"]["nodeName"] = node  # later pods of this pass see the GPUs taken

