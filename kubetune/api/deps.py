"""What every route module shares: path types, the response models, and the auth dependencies.

A route module is an `APIRouter` (see app.ROUTERS); it reads what the app holds from `request.app.state`
(settings, client, gate, own_token, catalog, offload, feeds, quotas) and authorizes with `access(verb)` or
`authenticated` before doing any work.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Header, Path, Request
from pydantic import BaseModel, ConfigDict, Field

from kubetune.api.auth import Gate, bearer_token
from kubetune.api.kube import Kube
from kubetune.errors import SpecError

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
Namespace = Annotated[str, Path(pattern=DNS_LABEL, max_length=63, description="A DNS-1123 label.")]
Name = Annotated[str, Path(pattern=DNS_SUBDOMAIN, max_length=253, description="A DNS-1123 subdomain name.")]
JOB_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/FineTuneJob"}}}}}

REFUSALS: dict[int | str, dict[str, Any]] = {
    401: {"description": "No token, or one Kubernetes does not accept"},
    403: {"description": "Kubernetes RBAC does not allow this verb on finetunejobs in this namespace"},
    413: {"description": "Body larger than the limit (1 MiB by default)"},
}


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
    result: str | None = Field(default=None, description="The evaluation's summary (status.result.summary): "
                               "held-out loss base -> adapter; the resource's status.result has the answers.")
    message: str | None = None
    created: str | None = None


class JobResponse(BaseModel):
    summary: JobSummary
    plan: dict[str, Any] | None = Field(default=None, description="The planner's decision at submission time.")
    resource: dict[str, Any] = Field(description="The FineTuneJob as stored in the cluster.")


class Problems(BaseModel):
    errors: list[str] = Field(description="One line per problem, each naming the field: `spec.lora.r: ...`")


PROBLEMS: dict[int | str, dict[str, Any]] = {
    **REFUSALS, 422: {"model": Problems, "description": "Invalid FineTuneJob: one line per field"},
    503: {"description": "Too many plans in progress, or the model hub did not answer; retry"},
    504: {"description": "Planning timed out"}}


def summarize(obj: dict[str, Any]) -> JobSummary:
    meta: dict[str, Any] = obj["metadata"] if isinstance(obj.get("metadata"), dict) else {}
    status: dict[str, Any] = obj["status"] if isinstance(obj.get("status"), dict) else {}

    def text(value: Any) -> str | None:
        return None if value is None else str(value)

    return JobSummary(
        name=str(meta.get("name", "")), namespace=str(meta.get("namespace", "")), phase=text(status.get("phase")),
        gpu=text(status.get("gpu")), vram=text(status.get("vram")), step=text(status.get("step")),
        loss=text(status.get("loss")), adapterUri=text(status.get("adapterUri")), message=text(status.get("message")),
        result=text((status.get("result") or {}).get("summary") if isinstance(status.get("result"), dict) else None),
        created=text(meta.get("creationTimestamp")),
    )


def acting_kube(request: Request, token: str) -> Kube:
    """The client to act with: the caller's token (passthrough) or the API's own (serviceaccount)."""
    state = request.app.state
    return Kube(state.client, state.own_token.get() if state.settings.auth == "serviceaccount" else token)


def access(verb: str) -> Callable[..., Awaitable[Kube]]:
    """A dependency: the caller may `verb` finetunejobs in the URL's namespace; returns the client to act with."""

    async def check(request: Request, namespace: Namespace,
                    authorization: Annotated[str | None, Header()] = None) -> Kube:
        token = bearer_token(authorization)
        gate: Gate = request.app.state.gate
        await gate.authorize(token, verb, namespace, request.path_params.get("name"))
        return acting_kube(request, token)

    return check


async def authenticated(request: Request, authorization: Annotated[str | None, Header()] = None) -> Kube:
    """A dependency: any caller Kubernetes authenticates; returns the client to act with."""
    token = bearer_token(authorization)
    await request.app.state.gate.authenticate(token)
    return acting_kube(request, token)


async def json_body(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise SpecError(f"body: not valid JSON ({exc})") from None
