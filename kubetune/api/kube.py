"""FineTuneJob calls on the Kubernetes API with one identity (the caller's, or the API pod's own).

Every path segment is checked by the routes (DNS-1123) and quoted here again, so no name can add a
query string or another path to the URL Kubernetes sees.
"""

from __future__ import annotations

import builtins
import json
from typing import Any
from urllib.parse import quote

import httpx
from fastapi import HTTPException

from kubetune import wire
from kubetune.spec import API_GROUP, API_VERSION, PLURAL

PASSED_ON = (401, 403, 404, 409, 422)


def job_path(namespace: str, name: str | None = None) -> str:
    base = wire.collection_path(f"{API_GROUP}/{API_VERSION}", PLURAL, quote(namespace, safe=''))
    return f"{base}/{quote(name, safe='')}" if name else base


class Kube:
    def __init__(self, client: httpx.AsyncClient, token: str) -> None:
        self.client, self.token = client, token

    async def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.token}"}
        if method == "PATCH":
            headers["Content-Type"] = "application/merge-patch+json"
        try:
            response = await self.client.request(method, path, headers=headers, **kwargs)
        except httpx.HTTPError as exc:
            raise HTTPException(502, f"Kubernetes API unreachable: {exc.__class__.__name__}: {exc}") from None
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if response.status_code >= 400:
            message = answer.get("message") if isinstance(answer, dict) else None
            code = response.status_code if response.status_code in PASSED_ON else 502
            raise HTTPException(code, str(message or response.text[:500] or f"HTTP {response.status_code}"))
        if not isinstance(answer, dict):
            raise HTTPException(502, f"Kubernetes API answered {method} {path} with something other than an object")
        return answer

    async def create(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self._call("POST", job_path(namespace), json=body)

    async def get(self, namespace: str, name: str) -> dict[str, Any]:
        return await self._call("GET", job_path(namespace, name))

    async def list(self, namespace: str) -> list[dict[str, Any]]:
        items = (await self._call("GET", job_path(namespace))).get("items") or []
        return [item for item in items if isinstance(item, dict)]

    async def patch(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        return await self._call("PATCH", job_path(namespace, name), content=json.dumps(patch).encode())

    async def delete(self, namespace: str, name: str) -> dict[str, Any]:
        return await self._call("DELETE", job_path(namespace, name))

    async def nodes(self) -> builtins.list[dict[str, Any]]:
        """The cluster's Nodes (the planner's GPU inventory), when this identity may list them."""
        items = (await self._call("GET", "/api/v1/nodes")).get("items") or []
        return [item for item in items if isinstance(item, dict)]

    async def pods(self) -> builtins.list[dict[str, Any]]:
        """Every pod that may hold GPUs (not finished), cluster-wide: what the nodes' free GPUs are net of."""
        answer = await self._call("GET", "/api/v1/pods",
                                  params={"fieldSelector": "status.phase!=Succeeded,status.phase!=Failed"})
        return [item for item in answer.get("items") or [] if isinstance(item, dict)]

    async def read(self, path: str, params: dict[str, str] | None = None) -> dict[str, Any]:
        """GET any Kubernetes path (built by the caller from checked parts) as this identity."""
        return await self._call("GET", path, params=params)
