"""Where a caller may work: the namespaces they may use, and a namespace's quota and its usage.

`GET /v1/namespaces`: the candidates are the configured list (`KUBETUNE_API_NAMESPACES`, the chart's
`api.namespaces`) or else the cluster's Namespaces (listed with the acting identity); each is kept when the
caller may `list` finetunejobs there (the same review as every other route, cached). A caller whose identity
may not list Namespaces, with no configured list, gets an empty list and a message saying so.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Header, HTTPException, Request

from kubetune import quota, wire
from kubetune.api.auth import bearer_token
from kubetune.api.deps import REFUSALS, Namespace, access, authenticated
from kubetune.api.kube import Kube

router = APIRouter(prefix="/v1", tags=["namespaces"])
KUEUE = "kueue.x-k8s.io"
MAX_CANDIDATES = 500  # namespaces reviewed for one answer


async def allowed(request: Request, token: str, namespace: str) -> bool:
    try:
        await request.app.state.gate.authorize(token, "list", namespace)
    except HTTPException:
        return False
    return True


@router.get("/namespaces", responses=REFUSALS)
async def namespaces(request: Request, kube: Annotated[Kube, Depends(authenticated)],
                     authorization: Annotated[str | None, Header()] = None) -> dict[str, Any]:
    """The namespaces where the caller may list FineTuneJobs (see the module docstring)."""
    token = bearer_token(authorization)
    configured: tuple[str, ...] = request.app.state.settings.namespaces
    message = ""
    if configured:
        candidates, source = list(configured), "configured"
    else:
        source = "cluster"
        try:
            listed = await kube.read("/api/v1/namespaces")
            candidates = sorted(str((n.get("metadata") or {}).get("name")) for n in listed.get("items") or [])
        except HTTPException as exc:
            candidates = []
            message = f"cannot list namespaces ({exc.detail}); type one, or ask for api.namespaces in the chart"
    candidates = candidates[:MAX_CANDIDATES]
    verdicts = await asyncio.gather(*(allowed(request, token, ns) for ns in candidates))
    return {"namespaces": [ns for ns, ok in zip(candidates, verdicts, strict=True) if ok], "source": source,
            "message": message}


async def kueue_state(kube: Kube, namespace: str) -> dict[str, Any] | None:
    """The namespace's Kueue LocalQueues and their ClusterQueues' admission state; None when Kueue is not served."""
    try:
        group = await kube.read(wire.group_path(KUEUE))
    except HTTPException:
        return None
    version = ((group.get("preferredVersion") or {}).get("groupVersion") or f"{KUEUE}/v1beta1")
    try:
        local = await kube.read(wire.collection_path(version, "localqueues", quote(namespace, safe="")))
    except HTTPException as exc:
        return {"localQueues": [], "message": f"cannot list LocalQueues: {exc.detail}"}
    queues = []
    for item in local.get("items") or []:
        cluster_queue = str((item.get("spec") or {}).get("clusterQueue") or "")
        entry: dict[str, Any] = {"name": (item.get("metadata") or {}).get("name"), "clusterQueue": cluster_queue,
                                 "status": item.get("status") or {}}
        if cluster_queue:
            try:
                found = await kube.read(f"/apis/{version}/clusterqueues/{quote(cluster_queue, safe='')}")
                entry["clusterQueueStatus"] = found.get("status") or {}
            except HTTPException as exc:
                entry["clusterQueueStatus"] = None
                entry["message"] = f"cannot read ClusterQueue {cluster_queue}: {exc.detail}"
        queues.append(entry)
    return {"localQueues": queues}


@router.get("/namespaces/{namespace}/quota", responses=REFUSALS)
async def namespace_quota(namespace: Namespace, request: Request,
                          kube: Annotated[Kube, Depends(access("list"))]) -> dict[str, Any]:
    """The namespace's kubetune quota (null: none) and what its FineTuneJobs use; with Kueue installed, also
    its LocalQueues' ClusterQueue admission state (Kueue's own quota, reported, not duplicated)."""
    limits = request.app.state.quotas.get().for_namespace(namespace)
    usage = quota.usage_of(await kube.list(namespace))
    return {"namespace": namespace, "limits": limits.to_json() if limits else None, "usage": usage.to_json(),
            "kueue": await kueue_state(kube, namespace)}
