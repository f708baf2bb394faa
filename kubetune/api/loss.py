"""A job's loss curve: from Prometheus when `KUBETUNE_PROMETHEUS_URL` is set (the trainer's kubetune_train_loss
and kubetune_train_step, joined by time), else from the history the operator keeps (status.lossHistory)."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Mapping
from typing import Annotated, Any

import httpx
from fastapi import APIRouter, Depends, Request

from kubetune.api.deps import REFUSALS, Name, Namespace, access
from kubetune.api.kube import Kube

router = APIRouter(prefix="/v1/namespaces/{namespace}/finetunejobs", tags=["finetunejobs"])
POINTS = 200  # at most, as status.lossHistory


def joined(loss: list[list[Any]], steps: list[list[Any]]) -> list[dict[str, Any]]:
    """Prometheus range vectors ([time, "value"] pairs) of loss and step -> [{step, loss}], one per step."""
    step_at = {float(t): int(float(v)) for t, v in steps}
    points: dict[int, float] = {}
    for t, value in loss:
        step = step_at.get(float(t))
        if step is not None and step > 0:
            points[step] = round(float(value), 4)
    return [{"step": s, "loss": points[s]} for s in sorted(points)]


async def from_prometheus(url: str, namespace: str, name: str, since: str | None, timeout: float
                          ) -> list[dict[str, Any]]:
    """Both series over the job's life, at most POINTS samples (names are DNS-1123: no PromQL can be injected)."""
    end = time.time()
    try:
        start = dt.datetime.fromisoformat(str(since).replace("Z", "+00:00")).timestamp() if since else end - 86400
    except ValueError:
        start = end - 86400
    resolution = max(1.0, (end - start) / POINTS)
    series = []
    async with httpx.AsyncClient(base_url=url, timeout=timeout) as client:
        for metric in ("kubetune_train_loss", "kubetune_train_step"):
            query = f'max({metric}{{namespace="{namespace}", job="{name}"}})'
            answer = await client.get("/api/v1/query_range", params={"query": query, "start": f"{start:.3f}",
                                                                      "end": f"{end:.3f}", "step": f"{resolution:g}"})
            answer.raise_for_status()
            result = answer.json()["data"]["result"]
            series.append(result[0]["values"] if result else [])
    return joined(series[0], series[1])


@router.get("/{name}/loss", responses=REFUSALS)
async def loss_curve(namespace: Namespace, name: Name, request: Request,
                     kube: Annotated[Kube, Depends(access("get"))]) -> dict[str, Any]:
    """`{"source": "prometheus"|"status", "points": [{"step", "loss"}...], "message"}`: Prometheus when the API
    is configured with one and it answers, otherwise (or on its failure, said in `message`) the operator's
    status.lossHistory."""
    job = await kube.get(namespace, name)
    status = job.get("status") if isinstance(job.get("status"), Mapping) else {}
    history = [p for p in (status or {}).get("lossHistory") or [] if isinstance(p, Mapping)]
    settings = request.app.state.settings
    message = ""
    if settings.prometheus_url:
        created = (job.get("metadata") or {}).get("creationTimestamp")
        try:
            points = await from_prometheus(settings.prometheus_url, namespace, name, created, settings.timeout)
            return {"source": "prometheus", "points": points, "message": ""}
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
            message = f"Prometheus did not answer ({exc.__class__.__name__}: {exc}); the operator's history instead"
    return {"source": "status", "points": history, "message": message}
