"""The app: settings, the shared Kubernetes client, the routers, the error handlers and the OpenAPI schema.

Each /v1 route first authenticates the caller and checks the one verb it needs (auth.Gate, through
deps.access / deps.authenticated); only then does it read the body, plan (off the event loop, bounded:
limits.Offload) and call Kubernetes. Routes live in one module per concern; add a module's router to ROUTERS.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from kubetune.api import jobs, loss, namespaces, planning, serving, streams, web
from kubetune.api.auth import Gate, OwnToken
from kubetune.api.deps import summarize
from kubetune.api.feed import Feeds
from kubetune.api.limits import BodyLimit, Offload
from kubetune.api.settings import ApiSettings
from kubetune.errors import HubUnreachable, SpecError
from kubetune.planning.cache import PlanCache
from kubetune.planning.cache_metrics import PlanCacheCollector
from kubetune.planning.gpus import GpuCatalog, load_catalog
from kubetune.quota import QuotaFile
from kubetune.spec import FineTuneJob

__all__ = ["ROUTERS", "create_app", "run_api", "summarize"]

health = APIRouter(tags=["health"])


@health.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@health.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> PlainTextResponse:
    """Prometheus metrics of this API process: the plan cache's hits, misses and entries
    (kubetune.planning.cache_metrics). No authentication, like /healthz: no job or user is named."""
    return PlainTextResponse(generate_latest(request.app.state.metrics), media_type=CONTENT_TYPE_LATEST)


ROUTERS: list[APIRouter] = [jobs.router, loss.router, serving.router, streams.router, planning.router,
                            namespaces.router, health,
                            web.router]  # web: the self-serve page at / (static files; no data without a token)


def lifespan_for(settings: ApiSettings) -> Any:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        verify: bool | ssl.SSLContext = ssl.create_default_context(cafile=settings.ca_file) if settings.ca_file \
            else True
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=50)
        async with httpx.AsyncClient(base_url=settings.kube_url, verify=verify, timeout=settings.timeout,
                                     limits=limits) as client:
            own: OwnToken = app.state.own_token
            app.state.client = client
            app.state.gate = Gate(client, settings.auth, own, settings.review_ttl)
            app.state.feeds = Feeds(client, lambda: own.get() if settings.auth == "serviceaccount" else None,
                                    settings.sse_replay, settings.sse_linger, settings.sse_queue)
            try:
                yield
            finally:
                app.state.feeds.close()
                app.state.offload.close()

    return lifespan


def add_error_handlers(app: FastAPI) -> None:
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


def openapi_for(app: FastAPI) -> Any:
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

    return openapi


def create_app(settings: ApiSettings | None = None, catalog: GpuCatalog | None = None) -> FastAPI:
    settings = settings or ApiSettings.from_env()
    app = FastAPI(
        title="kubetune", version="v1",
        summary="Self-serve QLoRA/LoRA fine-tuning: submit a FineTuneJob, get the plan, watch it train.",
        lifespan=lifespan_for(settings),
    )
    app.state.settings, app.state.own_token = settings, OwnToken(settings.token_file)
    app.state.catalog = catalog or load_catalog()
    app.state.offload = Offload(settings.plan_concurrency, settings.plan_timeout)
    app.state.quotas = QuotaFile(settings.quotas_file)
    app.state.plans = PlanCache()
    app.state.metrics = CollectorRegistry(auto_describe=True)
    app.state.metrics.register(PlanCacheCollector(app.state.plans))
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    for router in ROUTERS:
        app.include_router(router)
    add_error_handlers(app)
    app.openapi = openapi_for(app)  # type: ignore[method-assign]
    return app


def run_api(host: str, port: int) -> int:
    import uvicorn

    # Event streams never end by themselves: on SIGTERM, give requests 5 s, then close the streams (clients
    # reconnect to another replica with Last-Event-ID).
    uvicorn.run(create_app(), host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
    return 0
