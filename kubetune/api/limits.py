"""What keeps one request from stalling the API: a body limit, and blocking work off the event loop.

Planning reads config.json from S3 or local files (boto3, synchronous, with retries): it runs in a small
thread pool, at most `concurrency` plans at once (one more is 503 with Retry-After), and the caller gets
504 after `timeout` seconds while the thread finishes on its own. A slot is freed only when its thread
really ends, so a stuck S3 endpoint can never pile up threads; /healthz keeps answering throughout.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

T = TypeVar("T")


class BodyLimit:
    """ASGI middleware: 413 for a request body above `limit` bytes, by Content-Length or as it streams."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await self._drain(receive)
            await self._refuse(send)
            return
        seen = 0
        started = ended = False

        async def limited_receive() -> Message:
            nonlocal seen, ended
            message = await receive()
            if message["type"] == "http.request":
                ended = not message.get("more_body")
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                if not ended:
                    await self._drain(receive)
                await self._refuse(send)

    async def _drain(self, receive: Receive) -> None:
        """Read (and drop) what the client is still sending, up to 16x the limit, so it reads our 413 instead
        of a reset connection; past that the connection is closed on it."""
        dropped = 0
        while dropped <= 16 * self.limit:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body"):
                return
            dropped += len(message.get("body", b""))

    async def _refuse(self, send: Send) -> None:
        body = json.dumps({"errors": [f"body: larger than {self.limit} bytes"]}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


class Offload:
    """Run blocking calls in a bounded thread pool with a deadline (see the module docstring)."""

    def __init__(self, concurrency: int, timeout: float) -> None:
        self.concurrency, self.timeout = concurrency, timeout
        self.executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="kubetune-api")
        self.in_flight = 0

    async def run(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        if self.in_flight >= self.concurrency:
            raise HTTPException(503, f"busy: {self.concurrency} {what} requests in progress; retry shortly",
                                headers={"Retry-After": "5"})
        self.in_flight += 1
        future = asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

        def release(done: asyncio.Future[T]) -> None:
            self.in_flight -= 1
            if not done.cancelled():
                done.exception()  # retrieved, so a late failure after a 504 is not logged as unhandled

        future.add_done_callback(release)
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.timeout)
        except TimeoutError:
            raise HTTPException(504, f"{what} took longer than {self.timeout:g}s (a model source or config that "
                                     "does not answer?); nothing was created") from None

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
