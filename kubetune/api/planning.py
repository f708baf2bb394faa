"""What the planner sees: preview a plan, the GPU catalog with the cluster's free GPUs, the known models, and the
FineTuneJob schema a form is generated from."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request

from kubetune.api.deps import JOB_BODY, PROBLEMS, REFUSALS, authenticated, json_body
from kubetune.api.kube import Kube
from kubetune.planning.cache import PlanCache
from kubetune.planning.gpus import GpuCatalog
from kubetune.planning.models import CATALOG as MODELS
from kubetune.planning.placement import Inventory, Supply, inventory_of, supply_of
from kubetune.planning.plan import Plan
from kubetune.sources import model_architecture
from kubetune.spec import FineTuneJob, FineTuneJobSpec, parse_job

router = APIRouter(prefix="/v1", tags=["plan"])


def plan_for(job: FineTuneJob, catalog: GpuCatalog, supply: Supply | None = None,
             plans: PlanCache | None = None) -> Plan:
    """Blocking (may read config.json from S3 or disk): call through Offload. `supply`: the classes the
    cluster offers (None: the whole catalog). `plans`: the app's plan cache (app.state.plans; thread-safe): the
    same spec against the same architecture, catalog and supply is planned once."""
    arch = model_architecture(job.spec.model.name, job.spec.model.source)
    return (PlanCache(1) if plans is None else plans).plan(job.spec, arch, catalog, supply=supply)


async def cluster_supply(kube: Kube, catalog: GpuCatalog) -> Supply | None:
    """The GPU classes the cluster has nodes of (or can provision), as the operator plans; None when this
    identity may not list Nodes, and the plan is then against the whole catalog."""
    try:
        nodes = await kube.nodes()
    except HTTPException:
        return None
    return supply_of(inventory_of(nodes, []), catalog)


def gpu_table(catalog: GpuCatalog, inventory: Inventory | None) -> list[dict[str, Any]]:
    """Each class of the catalog, cheapest first, with its nodes and free GPUs (None: the inventory is unknown)."""
    rows = []
    for gpu in catalog.by_price():
        nodes = [n for n in inventory.nodes if gpu.matches(dict(n.labels))] if inventory else []
        ready = [n for n in nodes if n.schedulable]
        free = [inventory.free_gpus(n) for n in ready] if inventory else []
        rows.append({
            "name": gpu.name, "memoryGiB": round(gpu.memory_gib, 2), "bf16": gpu.bf16, "hourlyPrice": gpu.hourly_price,
            "maxPerNode": gpu.max_per_node, "provisionable": gpu.provisionable,
            "nodes": len(nodes) if inventory else None, "schedulableNodes": len(ready) if inventory else None,
            "allocatableGpus": sum(n.allocatable_gpus for n in ready) if inventory else None,
            "freeGpus": sum(free) if inventory else None, "mostFreeOnOneNode": max(free, default=0) if inventory
            else None,
        })
    return rows


@router.post("/plan", responses=PROBLEMS, openapi_extra=JOB_BODY)
async def plan(request: Request, kube: Annotated[Kube, Depends(authenticated)]) -> dict[str, Any]:
    """Plan a FineTuneJob without creating it, against the cluster's GPU nodes when the caller (or, in
    serviceaccount mode, the API) may list them (the same answer as `kubetune plan --kubeconfig`)."""
    body = await json_body(request)
    if isinstance(body, dict):
        body.setdefault("metadata", {"name": "plan-preview"})
    job = parse_job(body)
    state = request.app.state
    supply = await cluster_supply(kube, state.catalog)
    return (await state.offload.run("planning", plan_for, job, state.catalog, supply, state.plans)).summary()


@router.get("/gpus", tags=["catalog"], responses=REFUSALS)
async def gpus(request: Request, kube: Annotated[Kube, Depends(authenticated)]) -> dict[str, Any]:
    """The GPU catalog (cheapest first) with the cluster's nodes and free GPUs per class, as the operator plans
    against them (GPUs held by unfinished pods are not free). `inventory` is false, and the counts null, when
    this identity may not list Nodes and Pods."""
    try:
        inventory: Inventory | None = inventory_of(await kube.nodes(), await kube.pods())
        note = ""
    except HTTPException as exc:
        inventory, note = None, f"no inventory: {exc.detail}"
    catalog: GpuCatalog = request.app.state.catalog
    return {"inventory": inventory is not None, "message": note, "headroom": catalog.headroom,
            "classes": gpu_table(catalog, inventory)}


@router.get("/models", tags=["catalog"], responses=REFUSALS,
            dependencies=[Depends(authenticated)])
async def models() -> dict[str, Any]:
    """The architectures the planner knows without reading a config.json (any other hub id, s3:// or local
    model works too: its config.json is read at plan time)."""
    items = []
    for arch in sorted(MODELS.values(), key=lambda a: a.name.lower()):
        entry = asdict(arch)
        entry["parameters"] = arch.total_params
        items.append(entry)
    return {"items": items}


@router.get("/schema/finetunejob", tags=["catalog"], responses=REFUSALS, dependencies=[Depends(authenticated)])
async def schema() -> dict[str, Any]:
    """The JSON schema of a FineTuneJob's spec (kubetune.spec.FineTuneJobSpec, by alias: camelCase), the same
    model that validates submissions and generates the CRD: one schema for forms, the API and kubectl."""
    return FineTuneJobSpec.model_json_schema(by_alias=True)
