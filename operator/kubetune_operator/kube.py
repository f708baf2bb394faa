"""The few API writes the operator makes itself (children, Job suspend, status), over aiohttp with the
credentials kopf logged in with (`kopf.ConnectionInfo`, handed over by the `@kopf.on.login` handler).

Retries on 429, 5xx and dropped connections with the operator's backoffs; 409 on create means "exists", and
the child is adopted when this FineTuneJob owns it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp
import kopf

from kubetune import wire
from kubetune.spec import API_GROUP, API_VERSION, PLURAL

_COLLECTIONS = {  # (apiVersion, kind) -> plural
    ("v1", "ConfigMap"): "configmaps",
    ("v1", "Service"): "services",
    ("batch/v1", "Job"): "jobs",
    (wire.JOBSET_API, "JobSet"): "jobsets",
}
_API_VERSIONS = {kind: api_version for api_version, kind in _COLLECTIONS}
MERGE_PATCH = "application/merge-patch+json"
RETRIED = frozenset({429, 500, 502, 503, 504})
# Connections to the API server at once; more requests wait for one. A 2,000-job burst otherwise opens ~140
# (each a TLS handshake on a real cluster, and as many mutating requests in flight against the API server's
# default limit of 200), and the operator spent more CPU per job doing it: 2.9-3.5 ms with 64 against 3.3-4.1 ms
# unbounded, p99 create -> Job 4.6-5.7 s against 5.7-7.2 s (docs/benchmarks.md, issue 20). 16 was too few.
CONNECTIONS = 64
log = logging.getLogger("kubetune.operator")


class ApiError(Exception):
    def __init__(self, status: int, method: str, path: str, text: str) -> None:
        super().__init__(f"{method} {path}: HTTP {status}: {text[:300]}")
        self.status = status


class NotOurs(Exception):
    """An object with the child's name exists but another owner controls it."""


def collection_url(obj: Mapping[str, Any]) -> str:
    key = (obj["apiVersion"], obj["kind"])
    return wire.collection_path(obj["apiVersion"], _COLLECTIONS[key], obj["metadata"]["namespace"])


def object_url(obj: Mapping[str, Any]) -> str:
    return f"{collection_url(obj)}/{obj['metadata']['name']}"


def owned_by(obj: Mapping[str, Any], owner_uid: str) -> bool:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(ref.get("uid") == owner_uid for ref in refs)


class Kube:
    """A small Kubernetes API client on the operator's login."""

    def __init__(self, info: kopf.ConnectionInfo, backoffs: Sequence[float] = (0.2, 0.5, 1, 2, 4)) -> None:
        self.server = info.server.rstrip("/")
        self.backoffs = tuple(backoffs)
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=CONNECTIONS, ssl=info.as_ssl_context()),
            headers={**info.as_http_headers(), "User-Agent": "kubetune-operator"},
            proxy=info.proxy_url,
            trust_env=info.trust_env,
        )

    async def close(self) -> None:
        await self.session.close()

    async def request(self, method: str, path: str, payload: Any = None,
                      content_type: str = "application/json", *, answer: bool = True) -> dict[str, Any]:
        """The response's object; `answer=False`: the caller does not read it, so it is not parsed ({}): a
        created Job comes back whole, and at a burst of thousands parsing what nobody reads is CPU."""
        for delay in (*self.backoffs, None):
            try:
                async with self.session.request(method, self.server + path, json=payload,
                                                headers={"Content-Type": content_type}) as response:
                    if response.status < 300:
                        if not answer:
                            await response.read()
                            return {}
                        return dict(await response.json())
                    text = await response.text()
                    if response.status not in RETRIED or delay is None:
                        raise ApiError(response.status, method, path, text)
            except (aiohttp.ClientConnectionError, TimeoutError):
                if delay is None:
                    raise
            log.debug(f"{method} {path}: retrying in {delay}s")
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def create_or_adopt(self, obj: Mapping[str, Any], owner_uid: str) -> bool:
        """POST the object; on 409 read the existing one and adopt it if this FineTuneJob owns it.

        Returns whether it was created (False: adopted). A replayed event or a restarted operator lands in the
        409 branch.
        """
        try:
            await self.request("POST", collection_url(obj), dict(obj), answer=False)
            return True
        except ApiError as exc:
            if exc.status != 409:
                raise
        existing = await self.request("GET", object_url(obj))
        if not owned_by(existing, owner_uid):
            raise NotOurs(f"{obj['kind']} {obj['metadata']['namespace']}/{obj['metadata']['name']} exists and is not "
                          "owned by this FineTuneJob; delete it or rename the FineTuneJob")
        return False

    async def api_group(self, group: str) -> dict[str, Any] | None:
        """Discovery: the APIGroup document of `group` (its served versions), or None when it is not served."""
        try:
            return await self.request("GET", wire.group_path(group))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def set_job_suspend(self, namespace: str, name: str, suspend: bool, kind: str = "Job") -> bool:
        """Patch spec.suspend of a batch/v1 Job (or of a JobSet, `kind="JobSet"`); False when it is gone."""
        url = object_url({"apiVersion": _API_VERSIONS[kind], "kind": kind,
                          "metadata": {"namespace": namespace, "name": name}})
        try:
            await self.request("PATCH", url, {"spec": {"suspend": suspend}}, MERGE_PATCH, answer=False)
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def post_event(self, obj: Mapping[str, Any], type_: str, reason: str, message: str, now: str,
                         name: str) -> bool:
        """A core/v1 Event about `obj` (what `kubectl describe` lists), named `name`; awaited, so the caller
        knows it was recorded. The name is the transition's (handlers.event_name): the same transition decided
        again after a restart meets 409 and counts as recorded. A failure is logged and returns False: an Event
        never blocks a reconcile."""
        meta = obj["metadata"]
        event = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"namespace": meta["namespace"], "name": name},
            "involvedObject": {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"), "name": meta["name"],
                               "namespace": meta["namespace"], "uid": meta.get("uid")},
            "type": type_, "reason": reason, "message": message[:1024], "count": 1,
            "firstTimestamp": now, "lastTimestamp": now, "eventTime": None,
            "source": {"component": "kubetune-operator"}, "reportingComponent": "kubetune-operator",
            "reportingInstance": socket.gethostname(),
        }
        try:
            await self.request("POST", f"/api/v1/namespaces/{meta['namespace']}/events", event, answer=False)
        except ApiError as exc:
            if exc.status == 409:
                return True  # this transition's Event, posted before a restart
            log.warning(f"Event {reason} for {meta['namespace']}/{meta['name']} not posted: {exc!r}")
            return False
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning(f"Event {reason} for {meta['namespace']}/{meta['name']} not posted: {exc!r}")
            return False
        return True

    async def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> dict[str, Any] | None:
        """Merge-patch a FineTuneJob's status subresource; the updated object, or None when it is gone."""
        url = f"{wire.collection_path(f'{API_GROUP}/{API_VERSION}', PLURAL, namespace)}/{name}/status"
        try:
            return await self.request("PATCH", url, {"status": dict(status)}, MERGE_PATCH)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise
