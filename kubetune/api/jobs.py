"""FineTuneJob routes: submit (validate, plan, quota, create), list, get, suspend, resume, delete."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request

from kubetune import quota
from kubetune.api.deps import (
    JOB_BODY,
    PROBLEMS,
    REFUSALS,
    JobResponse,
    JobSummary,
    Name,
    Namespace,
    access,
    json_body,
    summarize,
)
from kubetune.api.kube import Kube
from kubetune.api.planning import cluster_supply, plan_for
from kubetune.errors import SpecError
from kubetune.planning.plan import Plan
from kubetune.spec import API_GROUP, API_VERSION, KIND, parse_job

router = APIRouter(prefix="/v1/namespaces/{namespace}/finetunejobs", tags=["finetunejobs"])
SUBMIT_REFUSALS: dict[int | str, dict[str, Any]] = {
    **PROBLEMS,
    403: {"description": "RBAC refuses, or the namespace's quota can never admit this plan (class, cost)"},
    429: {"description": "The namespace's quota is used up (concurrent jobs, GPUs); retry when a job ends"}}


def job_document(body: Any, namespace: str) -> dict[str, Any]:
    """The body as a FineTuneJob of this namespace (apiVersion and kind defaulted); SpecError otherwise."""
    if not isinstance(body, dict):
        raise SpecError(f"body: must be a FineTuneJob object, got {type(body).__name__}")
    body.setdefault("apiVersion", f"{API_GROUP}/{API_VERSION}")
    body.setdefault("kind", KIND)
    metadata = body.setdefault("metadata", {})
    if not isinstance(metadata, dict):
        raise SpecError("metadata: must be a mapping with at least a name")
    if metadata.setdefault("namespace", namespace) != namespace:
        raise SpecError(f"metadata.namespace: must match the URL's namespace {namespace!r}, "
                        f"got {metadata['namespace']!r}")
    return body


async def check_quota(request: Request, kube: Kube, namespace: str, plan: Plan) -> None:
    """403 or 429 naming the limit when the namespace's quota refuses this plan (kubetune.quota.decide)."""
    limits = request.app.state.quotas.get().for_namespace(namespace)
    if limits is None:
        return
    usage = quota.usage_of(await kube.list(namespace))
    refusal = quota.decide(limits, usage, quota.Ask(plan.gpu_class, plan.gpu_count, plan.estimated_cost))
    if refusal is not None:
        headers = {"Retry-After": "60"} if refusal.status == 429 else None
        raise HTTPException(refusal.status, f"namespace {namespace}: {refusal.message}", headers=headers)


@router.post("", status_code=201, response_model=JobResponse, responses=SUBMIT_REFUSALS, openapi_extra=JOB_BODY)
async def submit(namespace: Namespace, request: Request,
                 kube: Annotated[Kube, Depends(access("create"))]) -> JobResponse:
    """Validate, plan, check the namespace's quota and create a FineTuneJob. Nothing is created when any fails."""
    body = job_document(await json_body(request), namespace)
    job = parse_job(body)
    state = request.app.state
    supply = await cluster_supply(kube, state.catalog)
    plan = await state.offload.run("planning", plan_for, job, state.catalog, supply, state.plans)
    await check_quota(request, kube, namespace, plan)
    created = await kube.create(namespace, body)
    return JobResponse(summary=summarize(created), plan=plan.summary(), resource=created)


@router.get("", response_model=list[JobSummary], responses=REFUSALS)
async def list_jobs(namespace: Namespace, kube: Annotated[Kube, Depends(access("list"))]) -> list[JobSummary]:
    return [summarize(item) for item in await kube.list(namespace)]


@router.get("/{name}", response_model=JobResponse, responses=REFUSALS)
async def get_job(namespace: Namespace, name: Name, kube: Annotated[Kube, Depends(access("get"))]) -> JobResponse:
    obj = await kube.get(namespace, name)
    plan = (obj.get("status") or {}).get("plan") if isinstance(obj.get("status"), dict) else None
    return JobResponse(summary=summarize(obj), plan=plan if isinstance(plan, dict) else None, resource=obj)


@router.post("/{name}/suspend", response_model=JobSummary, responses=REFUSALS)
async def suspend(namespace: Namespace, name: Name, kube: Annotated[Kube, Depends(access("patch"))]) -> JobSummary:
    """Stop the trainer; checkpoints stay, `resume` continues from the latest."""
    return summarize(await kube.patch(namespace, name, {"spec": {"suspend": True}}))


@router.post("/{name}/resume", response_model=JobSummary, responses=REFUSALS)
async def resume(namespace: Namespace, name: Name, kube: Annotated[Kube, Depends(access("patch"))]) -> JobSummary:
    return summarize(await kube.patch(namespace, name, {"spec": {"suspend": False}}))


@router.delete("/{name}", status_code=202, responses=REFUSALS)
async def delete(namespace: Namespace, name: Name, kube: Annotated[Kube, Depends(access("delete"))]) -> dict[str, str]:
    """Delete the FineTuneJob; its ConfigMap and Job go with it (ownerReferences). S3 output stays."""
    await kube.delete(namespace, name)
    return {"status": "deleting", "name": name}
