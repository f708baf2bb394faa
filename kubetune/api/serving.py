"""`GET /v1/namespaces/{namespace}/finetunejobs/{name}/serving`: the ready-to-serve text of a job's adapter.

The same document as `status.serving` (kubetune.serving): whether the adapter meets the serving rules, a KServe
LLMInferenceService, and the vLLM command lines. Rendered from the spec when the operator has not written it;
409 while the job has no adapter. The caller needs `get` on the FineTuneJob, nothing more.
"""

# No `from __future__ import annotations`: FastAPI reads the route's annotations, and `access` is local to
# serving_router, so they must be evaluated where the route is defined.
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path

from kubetune.api.kube import Kube
from kubetune.serving import NoAdapterYet, serving_of

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
Namespace = Annotated[str, Path(pattern=DNS_LABEL, max_length=63, description="A DNS-1123 label.")]
Name = Annotated[str, Path(pattern=DNS_SUBDOMAIN, max_length=253, description="A DNS-1123 subdomain name.")]
Access = Callable[[str], Callable[..., Awaitable[Kube]]]


def serving_router(access: Access) -> APIRouter:
    """The router; `access(verb)` is the app's dependency that authorizes the caller and returns its client."""
    router = APIRouter(prefix="/v1/namespaces/{namespace}/finetunejobs", tags=["finetunejobs"])

    @router.get("/{name}/serving", responses={
        401: {"description": "No token, or one Kubernetes does not accept"},
        403: {"description": "Kubernetes RBAC does not allow get on finetunejobs in this namespace"},
        404: {"description": "No such FineTuneJob"},
        409: {"description": "The job has not written its adapter yet"}})
    async def serving(namespace: Namespace, name: Name,
                      kube: Annotated[Kube, Depends(access("get"))]) -> dict[str, Any]:
        """How to serve the job's adapter: `kserve` (an LLMInferenceService to apply), `vllm` (command lines),
        `ready` and `findings` (the serving rules the trainer checked; docs/serving.md)."""
        try:
            return serving_of(await kube.get(namespace, name))
        except NoAdapterYet as exc:
            raise HTTPException(409, str(exc)) from None

    return router
