"""`GET /v1/namespaces/{namespace}/finetunejobs/{name}/serving`: the ready-to-serve text of a job's adapter.

The same document as `status.serving` (kubetune.serving): whether the adapter meets the serving rules, a KServe
LLMInferenceService, and the vLLM command lines. Rendered from the spec when the operator has not written it;
409 while the job has no adapter. The caller needs `get` on the FineTuneJob, nothing more.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException

from kubetune.api.deps import REFUSALS, Name, Namespace, access
from kubetune.api.kube import Kube
from kubetune.serving import NoAdapterYet, serving_of

router = APIRouter(prefix="/v1/namespaces/{namespace}/finetunejobs", tags=["finetunejobs"])


@router.get("/{name}/serving", responses={
    **REFUSALS, 404: {"description": "No such FineTuneJob"},
    409: {"description": "The job has not written its adapter yet"}})
async def serving(namespace: Namespace, name: Name, kube: Annotated[Kube, Depends(access("get"))]) -> dict[str, Any]:
    """How to serve the job's adapter: `kserve` (an LLMInferenceService to apply), `vllm` (command lines),
    `ready` and `findings` (the serving rules the trainer checked; docs/serving.md)."""
    try:
        return serving_of(await kube.get(namespace, name))
    except NoAdapterYet as exc:
        raise HTTPException(409, str(exc)) from None
