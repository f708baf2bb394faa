"""The emulator's realism, over HTTP: what the operator tests rely on behaving like kube-apiserver."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
from kt_cluster import NS, Cluster

JOBS = f"/apis/batch/v1/namespaces/{NS}/jobs"
FTJS = f"/apis/kubetune.io/v1alpha1/namespaces/{NS}/finetunejobs"
MERGE = "application/merge-patch+json"


def job(name: str, labels: dict[str, str], owner: dict[str, Any] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": labels}
    if owner:
        meta["ownerReferences"] = [{"apiVersion": owner["apiVersion"], "kind": owner["kind"],
                                    "name": owner["metadata"]["name"], "uid": owner["metadata"]["uid"]}]
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": {"template": {"spec": {}}}}


async def test_identity_versions_selectors(cluster: Cluster) -> None:
    code, a = await cluster.request("POST", JOBS, job("a", {"team": "x", "tier": "gpu"}))
    assert code == 201 and a["metadata"]["uid"] and a["metadata"]["resourceVersion"]
    assert a["metadata"]["generation"] == 1
    _, b = await cluster.request("POST", JOBS, job("b", {"team": "y"}))
    assert int(b["metadata"]["resourceVersion"]) > int(a["metadata"]["resourceVersion"])
    code, _ = await cluster.request("POST", JOBS, job("a", {}))
    assert code == 409

    for selector, names in [("team=x", ["a"]), ("team!=x", ["b"]), ("team in (x,y)", ["a", "b"]),
                            ("tier", ["a"]), ("!tier", ["b"]), ("team notin (x)", ["b"])]:
        _, listed = await cluster.request("GET", f"{JOBS}?labelSelector={selector}")
        assert sorted(i["metadata"]["name"] for i in listed["items"]) == names, selector
    _, listed = await cluster.request("GET", f"{JOBS}?fieldSelector=metadata.name=b")
    assert [i["metadata"]["name"] for i in listed["items"]] == ["b"]

    stale = {**a, "spec": {"template": {"spec": {}}, "suspend": True}}
    stale["metadata"] = {**a["metadata"], "resourceVersion": "1"}
    code, _ = await cluster.request("PUT", f"{JOBS}/a", stale)
    assert code == 409  # optimistic concurrency
    code, patched = await cluster.request("PATCH", f"{JOBS}/a", {"metadata": {"labels": {"tier": None}}}, MERGE)
    assert code == 200 and patched["metadata"]["labels"] == {"team": "x"}  # null deletes (RFC 7386)
    assert patched["metadata"]["generation"] == 1  # metadata changes do not bump the generation
    _, patched = await cluster.request("PATCH", f"{JOBS}/a", {"spec": {"suspend": True}}, MERGE)
    assert patched["metadata"]["generation"] == 2


async def test_status_subresource_and_json_patch(cluster: Cluster) -> None:
    await cluster.request("POST", FTJS, {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
                                               "metadata": {"name": "s"}, "spec": {"suspend": False}})
    _, main = await cluster.request("PATCH", f"{FTJS}/s", {"status": {"phase": "Running"}}, MERGE)
    assert "phase" not in (main.get("status") or {})  # the main endpoint ignores .status
    _, sub = await cluster.request("PATCH", f"{FTJS}/s/status", {"status": {"phase": "Running"},
                                                                 "spec": {"suspend": True}}, MERGE)
    assert sub["status"] == {"phase": "Running"} and sub["spec"] == {"suspend": False}
    assert sub["metadata"]["generation"] == 1
    ops = [{"op": "test", "path": "/metadata/resourceVersion", "value": "0"},
           {"op": "add", "path": "/metadata/finalizers", "value": ["x"]}]
    code, _ = await cluster.request("PATCH", f"{FTJS}/s", ops, "application/json-patch+json")
    assert code == 422  # a failed test op, as kube-apiserver answers


async def test_garbage_collection_and_finalizers(cluster: Cluster) -> None:
    _, owner = await cluster.request("POST", FTJS, {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
                                                    "metadata": {"name": "o", "finalizers": ["test/hold"]},
                                                    "spec": {}})
    _, child = await cluster.request("POST", JOBS, job("child", {}, owner))
    await cluster.api.put_object("pods", {"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": "grandchild", "namespace": NS, "ownerReferences": [
            {"apiVersion": "batch/v1", "kind": "Job", "name": "child", "uid": child["metadata"]["uid"]}]}})
    code, _ = await cluster.request("DELETE", f"{FTJS}/o")
    assert code == 200
    held = cluster.api.read("finetunejobs", NS, "o")
    assert held is not None and held["metadata"]["deletionTimestamp"]  # a finalizer holds it
    assert cluster.api.read("jobs", NS, "child") is not None
    await cluster.request("PATCH", f"{FTJS}/o", {"metadata": {"finalizers": None}}, MERGE)
    assert cluster.api.read("finetunejobs", NS, "o") is None
    assert cluster.api.read("jobs", NS, "child") is None and cluster.api.read("pods", NS, "grandchild") is None


async def test_watch_resumes_from_a_resource_version(cluster: Cluster) -> None:
    _, first = await cluster.request("POST", JOBS, job("w1", {}))
    await cluster.request("POST", JOBS, job("w2", {}))
    since = first["metadata"]["resourceVersion"]
    seen: list[tuple[str, str]] = []
    async with aiohttp.ClientSession() as session, \
            session.get(f"{cluster.url}{JOBS}?watch=true&resourceVersion={since}&timeoutSeconds=2") as response:
        await cluster.request("PATCH", f"{JOBS}/w1", {"spec": {"suspend": True}}, MERGE)
        async def read() -> None:
            async for line in response.content:
                event = json.loads(line)
                seen.append((event["type"], event["object"]["metadata"]["name"]))
        await asyncio.wait_for(read(), 5)  # the server ends the stream after timeoutSeconds
    assert seen == [("ADDED", "w2"), ("MODIFIED", "w1")]  # only what happened after `since`


async def test_list_in_pages_from_one_snapshot(cluster: Cluster) -> None:
    """`limit` and `continue` as kube-apiserver answers them (kopf lists in chunks, settings.watching.chunk_size):
    pages in key order, all at the first page's resourceVersion, unaffected by writes between the pages; a
    used-up token is 410 Expired."""
    for name in ("p3", "p1", "p2", "p5", "p4"):
        await cluster.request("POST", JOBS, job(name, {"page": "yes"}))
    await cluster.request("POST", JOBS, job("other", {}))
    _, first = await cluster.request("GET", f"{JOBS}?limit=2&labelSelector=page")
    assert [i["metadata"]["name"] for i in first["items"]] == ["p1", "p2"]
    assert first["metadata"]["remainingItemCount"] == 3 and first["metadata"]["continue"]
    await cluster.request("PATCH", f"{JOBS}/p4", {"spec": {"suspend": True}}, MERGE)  # after the snapshot
    await cluster.request("DELETE", f"{JOBS}/p5")
    token = first["metadata"]["continue"]
    _, second = await cluster.request("GET", f"{JOBS}?limit=2&labelSelector=page&continue={token}")
    assert [i["metadata"]["name"] for i in second["items"]] == ["p3", "p4"]
    assert "suspend" not in second["items"][1]["spec"]  # as it was at the snapshot
    assert second["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]
    token2 = second["metadata"]["continue"]
    _, last = await cluster.request("GET", f"{JOBS}?limit=2&labelSelector=page&continue={token2}")
    assert [i["metadata"]["name"] for i in last["items"]] == ["p5"] and not last["metadata"].get("continue")
    code, gone = await cluster.request("GET", f"{JOBS}?limit=2&continue={token}")
    assert code == 410 and gone["reason"] == "Expired"
    _, whole = await cluster.request("GET", f"{JOBS}?labelSelector=page")
    assert [i["metadata"]["name"] for i in whole["items"]] == ["p1", "p2", "p3", "p4"]
