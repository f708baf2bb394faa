"""Reading Server-Sent Events the way the page does (a streaming fetch with the Authorization header)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass(frozen=True)
class Frame:
    id: str | None
    event: str | None
    data: Any  # parsed JSON
    comment: str | None = None  # a `: ...` line (heartbeat, closing note)


class Stream:
    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.lines = response.aiter_lines()

    async def next(self, timeout: float = 15.0) -> Frame:
        """The next message or comment."""
        fields: dict[str, str] = {}
        async with asyncio.timeout(timeout):
            async for line in self.lines:
                if line.startswith(":"):
                    return Frame(None, None, None, comment=line[1:].strip())
                if line == "":
                    if "data" in fields:
                        return Frame(fields.get("id"), fields.get("event"), json.loads(fields["data"]))
                    fields = {}
                    continue
                key, _, value = line.partition(":")
                fields[key] = value.removeprefix(" ")
        raise EOFError("the stream ended")

    async def message(self, timeout: float = 15.0) -> Frame:
        """The next message, skipping comments."""
        while True:
            frame = await self.next(timeout)
            if frame.comment is None:
                return frame


@asynccontextmanager
async def sse(client: httpx.AsyncClient, path: str, headers: dict[str, str] | None = None
              ) -> AsyncIterator[Stream]:
    async with client.stream("GET", path, headers=headers or {}, timeout=httpx.Timeout(15, read=30)) as response:
        assert response.status_code == 200, (response.status_code, await response.aread())
        assert response.headers["content-type"].startswith("text/event-stream")
        yield Stream(response)
