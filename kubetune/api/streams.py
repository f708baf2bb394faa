"""Live progress without polling: Server-Sent Events of a namespace's FineTuneJobs (feed.py does the watching).

    GET /v1/namespaces/{ns}/events                        every FineTuneJob of the namespace
    GET /v1/namespaces/{ns}/finetunejobs/{name}/events    one FineTuneJob

Authorized as the other routes are: `watch` on finetunejobs in the namespace (and the name), checked again at
every heartbeat, so a revoked binding ends the stream within `KUBETUNE_API_SSE_HEARTBEAT` (+ the review
cache's TTL). The token travels in the Authorization header only; browsers read the stream with fetch().
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, HTTPException, Request
from fastapi.responses import StreamingResponse

from kubetune.api.auth import Gate, bearer_token
from kubetune.api.deps import REFUSALS, Name, Namespace, access
from kubetune.api.feed import Feed, Listener, Message

router = APIRouter(prefix="/v1/namespaces/{namespace}", tags=["events"])
STREAM: dict[int | str, dict[str, Any]] = {
    **REFUSALS, 200: {"description": "text/event-stream: `snapshot`, `job` and `kevent` messages, `: ping` lines",
                      "content": {"text/event-stream": {}}}}
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Connection": "keep-alive"}


async def frames(feed: Feed, listener: Listener, first: list[Message], gate: Gate, namespace: str,
                 name: str | None, heartbeat: float) -> AsyncIterator[bytes]:
    try:
        yield b"retry: 2000\n\n"
        for old in first:
            yield old.frame()
        while True:
            try:
                message: Message | None = await asyncio.wait_for(listener.queue.get(), heartbeat)
            except TimeoutError:
                try:
                    await gate.authorize(listener.token, "watch", namespace, name)
                except HTTPException as exc:
                    yield f": closed: {exc.detail}\n\n".encode()
                    return
                yield b": ping\n\n"
                continue
            if message is None:
                yield f": closed: {listener.closed}; reconnect with Last-Event-ID\n\n".encode()
                return
            yield message.frame()
    finally:
        feed.leave(listener)


async def stream(request: Request, namespace: str, name: str | None, last_event_id: str | None,
                 authorization: str | None) -> StreamingResponse:
    state = request.app.state
    token = bearer_token(authorization)
    feed: Feed = state.feeds.get(namespace)
    try:
        listener, first = await asyncio.wait_for(feed.join(token, name, last_event_id), state.settings.timeout)
    except TimeoutError:
        raise HTTPException(504, f"the watch of namespace {namespace} did not start within "
                                 f"{state.settings.timeout:g}s") from None
    if listener.closed:  # the watch's list was refused with this token
        feed.leave(listener)
        raise HTTPException(403, listener.closed)
    return StreamingResponse(frames(feed, listener, first, state.gate, namespace, name, state.settings.sse_heartbeat),
                             media_type="text/event-stream", headers=HEADERS)


@router.get("/events", responses=STREAM, dependencies=[Depends(access("watch"))], response_class=StreamingResponse)
async def namespace_events(namespace: Namespace, request: Request,
                           last_event_id: Annotated[str | None, Header(max_length=64)] = None,
                           authorization: Annotated[str | None, Header()] = None) -> StreamingResponse:
    """Every FineTuneJob of the namespace, live: a `snapshot` first, then `job` (ADDED, MODIFIED, DELETED) and
    `kevent` (their Kubernetes Events) messages, each with an id; `Last-Event-ID` resumes after that id."""
    return await stream(request, namespace, None, last_event_id, authorization)


@router.get("/finetunejobs/{name}/events", responses=STREAM, dependencies=[Depends(access("watch"))],
            response_class=StreamingResponse)
async def job_events(namespace: Namespace, name: Name, request: Request,
                     last_event_id: Annotated[str | None, Header(max_length=64)] = None,
                     authorization: Annotated[str | None, Header()] = None) -> StreamingResponse:
    """One FineTuneJob, live (the same messages as the namespace's stream, for this name only)."""
    return await stream(request, namespace, name, last_event_id, authorization)
