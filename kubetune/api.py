"""The self-serve REST API: platform teams create, watch and stop FineTuneJobs over HTTP.

It is a thin gateway in front of the Kubernetes API: every FineTuneJob is the same custom resource
`kubectl apply` creates, validated by the same spec model and planned by the same planner before it
is stored, so a bad request never reaches the cluster and the caller sees the plan at once.

Authorization stays with Kubernetes RBAC: by default the caller's bearer token is passed through,
so a team can only touch the namespaces its RoleBindings allow. `KUBETUNE_API_AUTH=serviceaccount`
uses the API pod's own token instead (for a trusted network behind another gateway).

    kubetune api --port 8000          # OpenAPI docs at /docs
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import httpx
from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from kubetune.errors import KubetuneError, SpecError
from kubetune.planning.gpus import GpuCatalog, load_catalog
from kubetune.planning.models import model_architecture
from kubetune.planning.plan import Plan, make_plan
from kubetune.spec import API_GROUP, API_VERSION, KIND, PLURAL, FineTuneJob, parse_job

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


@dataclass(frozen=True)
class ApiSettings:
    kube_url: str = "https://kubernetes.default.svc"
    ca_file: str | None = None
    auth: str = "passthrough"  # or "serviceaccount"
    timeout: float = 10.0

    @classmethod
    def from_env(cls) -> ApiSettings:
        ca = os.environ.get("KUBETUNE_KUBE_CA") or (
            str(SERVICE_ACCOUNT / "ca.crt") if (SERVICE_ACCOUNT / "ca.crt").exists() else None)
        auth = os.environ.get("KUBETUNE_API_AUTH", "passthrough")
        if auth not in ("passthrough", "serviceaccount"):
            raise KubetuneError(f"KUBETUNE_API_AUTH: must be one of: passthrough, serviceaccount; got {auth!r}")
        return cls(kube_url=os.environ.get("KUBETUNE_KUBE_URL", cls.kube_url), ca_file=ca, auth=auth)


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
    meta, status = obj.get("metadata", {}), obj.get("status") or {}
    return JobSummary(
        name=meta.get("name", ""), namespace=meta.get("namespace", ""), phase=status.get("phase"),
        gpu=status.get("gpu"), vram=status.get("vram"), step=status.get("step"), loss=status.get("loss"),
        adapterUri=status.get("adapterUri"), message=status.get("message"), created=meta.get("creationTimestamp"),
    )


class Kube:
    """FineTuneJob calls on the Kubernetes API, with the caller's or the pod's credentials."""

    def __init__(self, client: httpx.AsyncClient, token: str | None) -> None:
        self.client, self.token = client, token

    def _path(self, namespace: str, name: str | None = None) -> str:
        base = f"/apis/{API_GROUP}/{API_VERSION}/namespaces/{namespace}/{PLURAL}"
        return f"{base}/{name}" if name else base

    async def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        if method == "PATCH":
            headers["Content-Type"] = "application/merge-patch+json"
        try:
            response = await self.client.request(method, path, headers=headers, **kwargs)
        except httpx.HTTPError as exc:
            raise HTTPException(502, f"Kubernetes API unreachable: {exc}") from None
        if response.status_code >= 400:
            try:
                message = response.json().get("message") or response.text
            except ValueError:
                message = response.text
            code = response.status_code if response.status_code in (401, 403, 404, 409, 422) else 502
            raise HTTPException(code, message)
        return dict(response.json())

    async def create(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self._call("POST", self._path(namespace), json=body)

    async def get(self, namespace: str, name: str) -> dict[str, Any]:
        return await self._call("GET", self._path(namespace, name))

    async def list(self, namespace: str) -> list[dict[str, Any]]:
        return list((await self._call("GET", self._path(namespace))).get("items", []))

    async def patch(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        return await self._call("PATCH", self._path(namespace, name), content=json.dumps(patch).encode())

    async def delete(self, namespace: str, name: str) -> dict[str, Any]:
        return await self._call("DELETE", self._path(namespace, name))


def kube_client(request: Request, authorization: Annotated[str | None, Header()] = None) -> Kube:
    """The caller's Kubernetes identity (passthrough), or the API pod's own (serviceaccount)."""
    settings: ApiSettings = request.app.state.settings
    if settings.auth == "serviceaccount":
        token_file = SERVICE_ACCOUNT / "token"
        token = token_file.read_text().strip() if token_file.exists() else None
    elif authorization and authorization.lower().startswith("bearer "):
        token = authorization.split(" ", 1)[1].strip()
    else:
        raise HTTPException(401, "send your Kubernetes token as 'Authorization: Bearer <token>'")
    return Kube(request.app.state.client, token)


KubeDep = Annotated[Kube, Depends(kube_client)]


def plan_for(job: FineTuneJob, catalog: GpuCatalog) -> Plan:
    return make_plan(job.spec, model_architecture(job.spec.model.name, job.spec.model.source), catalog)


def create_app(settings: ApiSettings | None = None, catalog: GpuCatalog | None = None) -> FastAPI:
    settings = settings or ApiSettings.from_env()
    catalog = catalog or load_catalog()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        verify: bool | str = settings.ca_file or True
        async with httpx.AsyncClient(base_url=settings.kube_url, verify=verify, timeout=settings.timeout) as client:
            app.state.client = client
            yield

    app = FastAPI(
        title="kubetune", version="v1",
        summary="Self-serve QLoRA/LoRA fine-tuning: submit a FineTuneJob, get the plan, watch it train.",
        lifespan=lifespan,
    )
    app.state.settings = settings

    jobs = APIRouter(prefix="/v1/namespaces/{namespace}/finetunejobs", tags=["finetunejobs"])
    problems: dict[int | str, dict[str, Any]] = {
        422: {"model": Problems, "description": "Invalid FineTuneJob: one line per field"}}

    @jobs.post("", status_code=201, response_model=JobResponse, responses=problems)
    async def submit(namespace: str, body: dict[str, Any], kube: KubeDep) -> JobResponse:
        """Validate, plan and create a FineTuneJob. Nothing is created when either fails."""
        body.setdefault("apiVersion", f"{API_GROUP}/{API_VERSION}")
        body.setdefault("kind", KIND)
        metadata = body.setdefault("metadata", {})
        if not isinstance(metadata, dict):
            raise SpecError("metadata: must be a mapping with at least a name")
        if metadata.setdefault("namespace", namespace) != namespace:
            raise SpecError(f"metadata.namespace: must match the URL's namespace {namespace!r}, "
                            f"got {metadata['namespace']!r}")
        job = parse_job(body)
        plan = plan_for(job, catalog)
        created = await kube.create(namespace, body)
        return JobResponse(summary=summarize(created), plan=plan.summary(), resource=created)

    @jobs.get("", response_model=list[JobSummary])
    async def list_jobs(namespace: str, kube: KubeDep) -> list[JobSummary]:
        return [summarize(item) for item in await kube.list(namespace)]

    @jobs.get("/{name}", response_model=JobResponse)
    async def get_job(namespace: str, name: str, kube: KubeDep) -> JobResponse:
        obj = await kube.get(namespace, name)
        return JobResponse(summary=summarize(obj), plan=(obj.get("status") or {}).get("plan"), resource=obj)

    @jobs.post("/{name}/suspend", response_model=JobSummary)
    async def suspend(namespace: str, name: str, kube: KubeDep) -> JobSummary:
        """Stop the trainer; checkpoints stay, `resume` continues from the latest."""
        return summarize(await kube.patch(namespace, name, {"spec": {"suspend": True}}))

    @jobs.post("/{name}/resume", response_model=JobSummary)
    async def resume(namespace: str, name: str, kube: KubeDep) -> JobSummary:
        return summarize(await kube.patch(namespace, name, {"spec": {"suspend": False}}))

    @jobs.delete("/{name}", status_code=202)
    async def delete(namespace: str, name: str, kube: KubeDep) -> dict[str, str]:
        """Delete the FineTuneJob; its ConfigMap and Job go with it (ownerReferences). S3 output stays."""
        await kube.delete(namespace, name)
        return {"status": "deleting", "name": name}

    app.include_router(jobs)

    @app.post("/v1/plan", tags=["plan"], responses=problems)
    async def plan(body: dict[str, Any]) -> dict[str, Any]:
        """Plan a FineTuneJob without creating it (the same answer as `kubetune plan -o json`)."""
        body.setdefault("metadata", {"name": "plan-preview"})
        return plan_for(parse_job(body), catalog).summary()

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.exception_handler(SpecError)
    async def invalid(_: Request, exc: SpecError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"errors": exc.problems})

    @app.exception_handler(RequestValidationError)
    async def unreadable(_: Request, exc: RequestValidationError) -> JSONResponse:
        lines = [f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}" for e in exc.errors()]
        return JSONResponse(status_code=422, content={"errors": lines})

    return app


def run_api(host: str, port: int) -> int:
    import uvicorn

    uvicorn.run(create_app(), host=host, port=port, log_level="info")
    return 0
