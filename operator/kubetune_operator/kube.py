"""The few API writes the handlers make besides kopf's own status patches and events.

They go through kopf's API client, so they use the operator's login (in-cluster, kubeconfig) and kopf's
retries on 5xx, 429 and dropped connections (`settings.networking.error_backoffs`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import kopf
from kopf._cogs.clients import api, errors  # kopf's own client: same credentials and retry policy

_COLLECTIONS = {
    ("v1", "ConfigMap"): "/api/v1/namespaces/{ns}/configmaps",
    ("batch/v1", "Job"): "/apis/batch/v1/namespaces/{ns}/jobs",
}


class NotOurs(kopf.PermanentError):
    """An object with the child's name exists but another owner controls it."""


def collection_url(obj: Mapping[str, Any]) -> str:
    key = (obj["apiVersion"], obj["kind"])
    return _COLLECTIONS[key].format(ns=obj["metadata"]["namespace"])


def object_url(obj: Mapping[str, Any]) -> str:
    return f"{collection_url(obj)}/{obj['metadata']['name']}"


def _owned_by(obj: Mapping[str, Any], owner_uid: str) -> bool:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(ref.get("uid") == owner_uid for ref in refs)


async def create_or_adopt(obj: Mapping[str, Any], owner_uid: str, settings: kopf.OperatorSettings,
                          logger: logging.Logger | kopf.Logger) -> tuple[dict[str, Any], bool]:
    """POST the object; on 409 read the existing one and adopt it if this FineTuneJob owns it.

    Returns (object, created). A replayed event or a restarted operator lands in the 409 branch.
    """
    try:
        created = await api.post(collection_url(obj), payload=obj, settings=settings, logger=logger)
        return created, True
    except errors.APIConflictError:
        existing = await api.get(object_url(obj), settings=settings, logger=logger)
        if not _owned_by(existing, owner_uid):
            raise NotOurs(
                f"{obj['kind']} {obj['metadata']['namespace']}/{obj['metadata']['name']} exists and is not owned "
                f"by this FineTuneJob; delete it or rename the FineTuneJob"
            ) from None
        return existing, False


async def set_job_suspend(namespace: str, name: str, suspend: bool, settings: kopf.OperatorSettings,
                          logger: logging.Logger | kopf.Logger) -> bool:
    """Patch batch/v1 Job spec.suspend; False when the Job is gone."""
    url = f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}"
    try:
        await api.patch(url, payload={"spec": {"suspend": suspend}}, settings=settings, logger=logger,
                        headers={"Content-Type": "application/merge-patch+json"})
    except errors.APINotFoundError:
        return False
    return True


async def patch_status(namespace: str, name: str, status: Mapping[str, Any], settings: kopf.OperatorSettings,
                       logger: logging.Logger | kopf.Logger) -> dict[str, Any] | None:
    """Merge-patch a FineTuneJob's status subresource; the updated object, or None when it is gone."""
    url = f"/apis/kubetune.io/v1alpha1/namespaces/{namespace}/finetunejobs/{name}/status"
    try:
        result: dict[str, Any] = await api.patch(url, payload={"status": dict(status)}, settings=settings,
                                                 logger=logger,
                                                 headers={"Content-Type": "application/merge-patch+json"})
    except errors.APINotFoundError:
        return None
    return result
