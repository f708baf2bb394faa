"""The routes: create, list, get, suspend, resume, delete FineTuneJobs, and preview a plan.

Each /v1 route first authenticates the caller and checks the one verb it needs (auth.Gate); only then
does it read the body, plan (off the event loop, bounded: limits.Offload) and call Kubernetes.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

import httpx
from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from kubetune.api.auth import Gate, OwnToken, bearer_token
from kubetune.api.kube import Kube
from kubetune.api.limits import BodyLimit, Offload
from kubetune.api.serving import serving_router
from kubetune.api.settings import ApiSettings
from kubetune.errors import SpecError
from kubetune.planning.gpus import GpuCatalog, load_catalog
from kubetune.planning.hub_config import HubUnreachable
from kubetune.planning.models import model_architecture
from kubetune.planning.placement import Supply, inventory_of, supply_of
from kubetune.planning.plan import Plan, make_plan
from kubetune.spec import API_GROUP, API_VERSION, KIND, FineTuneJob, parse_job

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
Namespace = Annotated[str, Path(pattern=DNS_LABEL, max_length=63, description="A DNS-1123 label.")]
Name = Annotated[str, Path(pattern=DNS_SUBDOMAIN, max_length=253, description="A DNS-1123 subdomain name.")]
JOB_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/FineTuneJob"}}}}}


class JobSummary(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    name: str
    namespace: str
    phase: str | None = None
    gpu: str | None = None
    vram: str | None = None
    step: str | None = None
    loss: str | None = None
    adapter_uri: str | None = Field(default=None, alias="adapterUri")
    message: str | None = None
    created: str | None = None


class JobResponse(BaseModel):
    summary: JobSummary
    plan: dict[str, Any] | None = Field(default=None, description="The planner's decision at submission time.")
    resource: dict[str, Any] = Field(description="The FineTuneJob as stored in the cluster.")


class Problems(BaseModel):
    errors: list[str] = Field(description="One line per problem, each naming the field: `spec.lora.r: ...`")


def summarize(obj: dict[str, Any]) -> JobSummary:
    meta: dict[str, Any] = obj["metadata"] if isinstance(obj.get("metadata"), dict) else {}
    status: dict[str, Any] = obj["status"] if isinstance(obj.get("status"), dict) else {}

    def text(value: Any) -> str | None:
        return None if value is None else str(value)

    return JobSummary(
        name=str(meta.get("name", "")), namespace=str(meta.get("namespace", "")), phase=text(status.get("phase")),
        gpu=text(status.get("gpu")), vram=text(status.get("vram")), step=text(status.get("step")),
        loss=text(status.get("loss")), adapterUri=text(status.get("adapterUri")), message=text(status.get("message")),
        created=text(meta.get("creationTimestamp")),
    )


def plan_for(job: FineTuneJob, catalog: GpuCatalog, supply: Supply | None = None) -> Plan:
    """Blocking (may read config.json from S3 or disk): call through Offload. `supply`: the classes the
    cluster offers (None: the whole catalog)."""
    return make_plan(job.spec, model_architecture(job.spec.model.name, job.spec.model.source), catalog,
                     supply=supply)


async def cluster_supply(kube: Kube, catalog: GpuCatalog) -> Supply | None:
    """The GPU classes the cluster has nodes of (or can provision), as the operator plans; None when this
    identity may not list Nodes, and the plan is then against the whole catalog."""
    try:
        nodes = await kube.nodes()
    except HTTPException:
        return None
    return supply_of(inventory_of(nodes, []), catalog)


def access(verb: str) -> Callable[..., Awaitable[Kube]]:
    """A dependency: the caller may `verb` finetunejobs in the URL's namespace; returns the client to act with."""

    async def check(request: Request, namespace: Namespace,
                    authorization: Annotated[str | None, Header()] = None) -> Kube:
        token = bearer_token(authorization)
        gate: Gate = request.app.state.gate
        await gate.authorize(token, verb, namespace, request.path_params.get("name"))
        own = request.app.state.own_token
        return Kube(request.app.state.client, own.get() if request.app.state.settings.auth == "serviceaccount"
                    else token)

    return check


async def authenticated(request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
    await request.app.state.gate.authenticate(bearer_token(authorization))


async def json_body(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise SpecError(f"body: not valid JSON ({exc})") from None


def create_app(settings: ApiSettings | None = None, catalog: GpuCatalog | None = None) -> FastAPI:
    settings = settings or ApiSettings.from_env()
    catalog = catalog or load_catalog()
    offload = Offload(settings.plan_concurrency, settings.plan_timeout)
    own_token = OwnToken(settings.token_file)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        verify: bool | ssl.SSLContext = ssl.create_default_context(cafile=settings.ca_file) if settings.ca_file \
            else True
        async with httpx.AsyncClient(base_url=settings.kube_url, verify=verify, timeout=settings.timeout) as client:
            app.state.client = client
            app.state.gate = Gate(client, settings.auth, own_token, settings.review_ttl)
            try:
                yield
            finally:
                offload.close()

    app = FastAPI(
        title="kubetune", version="v1",
        summary="Self-serve QLoRA/LoRA fine-tuning: submit a FineTuneJob, get the plan, watch it train.",
        lifespan=lifespan,
    )
    app.state.settings, app.state.own_token = settings, own_token
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)

    jobs = APIRouter(prefix="/v1/namespaces/{namespace}/finetunejobs", tags=["finetunejobs"])
    refusals: dict[int | str, dict[str, Any]] = {
        401: {"description": "No token, or one Kubernetes does not accept"},
        403: {"description": "Kubernetes RBAC does not allow this verb on finetunejobs in this namespace"},
        413: {"description": "Body larger than the limit (1 MiB by default)"},
    }
    problems: dict[int | str, dict[str, Any]] = {
        **refusals, 422: {"model": Problems, "description": "Invalid FineTuneJob: one line per field"},
        503: {"description": "Too many plans in progress, or the model hub did not answer; retry"},
        504: {"description": "Planning timed out"}}

    @jobs.post("", status_code=201, response_model=JobResponse, responses=problems, openapi_extra=JOB_BODY)
    async def submit(namespace: Namespace, request: Request,
                     kube: Annotated[Kube, Depends(access("create"))]) -> JobResponse:
        """Validate, plan and create a FineTuneJob. Nothing is created when either fails."""
        body = await json_body(request)
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
        job = parse_job(body)
        plan = await offload.run("planning", plan_for, job, catalog, await cluster_supply(kube, catalog))
        created = await kube.create(namespace, body)
        return JobResponse(summary=summarize(created), plan=plan.summary(), resource=created)

    @jobs.get("", response_model=list[JobSummary], responses=refusals)
    async def list_jobs(namespace: Namespace, kube: Annotated[Kube, Depends(access("list"))]) -> list[JobSummary]:
        return [summarize(item) for item in await kube.list(namespace)]

    @jobs.get("/{name}", response_model=JobResponse, responses=refusals)
    async def get_job(namespace: Namespace, name: Name, kube: Annotated[Kube, Depends(access("get"))]) -> JobResponse:
        obj = await kube.get(namespace, name)
        plan = (obj.get("status") or {}).get("plan") if isinstance(obj.get("status"), dict) else None
        return JobResponse(summary=summarize(obj), plan=plan if isinstance(plan, dict) else None, resource=obj)

    @jobs.post("/{name}/suspend", response_model=JobSummary, responses=refusals)
    async def suspend(namespace: Namespace, name: Name, kube: Annotated[Kube, Depends(access("patch"))]) -> JobSummary:
        """Stop the trainer; checkpoints stay, `resume` continues from the latest."""
        return summarize(await kube.patch(namespace, name, {"spec": {"suspend": True}}))

    @jobs.post("/{name}/resume", response_model=JobSummary, responses=refusals)
    async def resume(namespace: Namespace, name: Name, kube: Annotated[Kube, Depends(access("patch"))]) -> JobSummary:
        return summarize(await kube.patch(namespace, name, {"spec": {"suspend": False}}))

    @jobs.delete("/{name}", status_code=202, responses=refusals)
    async def delete(namespace: Namespace, name: Name,
                     kube: Annotated[Kube, Depends(access("delete"))]) -> dict[str, str]:
        """Delete the FineTuneJob; its ConfigMap and Job go with it (ownerReferences). S3 output stays."""
        await kube.delete(namespace, name)
        return {"status": "deleting", "name": name}

    app.include_router(jobs)
    app.include_router(serving_router(access))

    @app.post("/v1/plan", tags=["plan"], responses=problems, openapi_extra=JOB_BODY,
              dependencies=[Depends(authenticated)])
    async def plan(request: Request, authorization: Annotated[str | None, Header()] = None) -> dict[str, Any]:
        """Plan a FineTuneJob without creating it, against the cluster's GPU nodes when the caller (or, in
        serviceaccount mode, the API) may list them (the same answer as `kubetune plan --kubeconfig`)."""
        body = await json_body(request)
        if isinstance(body, dict):
            body.setdefault("metadata", {"name": "plan-preview"})
        job = parse_job(body)
        own = request.app.state.own_token
        kube = Kube(request.app.state.client, own.get() if settings.auth == "serviceaccount"
                    else bearer_token(authorization))
        supply = await cluster_supply(kube, catalog)
        return (await offload.run("planning", plan_for, job, catalog, supply)).summary()

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.exception_handler(SpecError)
    async def invalid(_: Request, exc: SpecError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"errors": exc.problems})

    @app.exception_handler(HubUnreachable)
    async def hub_down(_: Request, exc: HubUnreachable) -> JSONResponse:
        """An uncatalogued hub id whose config.json the hub did not serve: not the caller's fault; retry."""
        return JSONResponse(status_code=503, content={"errors": [str(exc)]}, headers={"Retry-After": "10"})

    @app.exception_handler(RequestValidationError)
    async def unreadable(_: Request, exc: RequestValidationError) -> JSONResponse:
        lines = [f"{'.'.join(str(p) for p in e['loc'] if p not in ('body', 'path', 'header')) or 'body'}: "
                 f"{e['msg']}" for e in exc.errors()]
        return JSONResponse(status_code=422, content={"errors": lines})

    def openapi() -> dict[str, Any]:
        """FastAPI's schema, plus the FineTuneJob model (and its parts) that request bodies refer to."""
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            job = FineTuneJob.model_json_schema(by_alias=True, ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(job.pop("$defs", {}))
            components["FineTuneJob"] = job
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def run_api(host: str, port: int) -> int:
    import uvicorn

    uvicorn.run(create_app(), host=host, port=port, log_level="info")
    return 0
