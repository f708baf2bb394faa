"""A TCP proxy on 127.0.0.1 in front of the API whose open connections a test can cut: a dropped stream, as a
load balancer's idle timeout or a network blip drops one, with the API itself untouched."""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType

import aiohttp
import aiohttp.web


class CuttableProxy:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.live: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> CuttableProxy:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self.server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.cut()
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    def cut(self) -> int:
        """Abort every open connection, both sides; returns how many."""
        writers = list(self.live)
        for writer in writers:
            writer.transport.abort()
        return len(writers) // 2

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.live |= {writer, up_writer}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.transport.abort()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            self.live -= {writer, up_writer}


class HeaderProxy:
    """What oauth2-proxy does for the page, after its own sign-in: forwards every request to the API with
    `Authorization: Bearer <the user's token>` added, and streams the answer back as it comes (the SSE)."""

    def __init__(self, upstream: str, token: str) -> None:
        self.upstream, self.token = upstream, token
        self.runner: aiohttp.web.AppRunner | None = None
        self.session: aiohttp.ClientSession | None = None
        self.url = ""

    async def __aenter__(self) -> HeaderProxy:
        app = aiohttp.web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self.session = aiohttp.ClientSession(auto_decompress=False)
        self.runner = aiohttp.web.AppRunner(app, handler_cancellation=True)
        await self.runner.setup()
        site = aiohttp.web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        assert self.runner is not None and self.session is not None
        await self.session.close()  # ends the streams in flight now, not at their next heartbeat
        await self.runner.cleanup()

    async def _forward(self, request: aiohttp.web.Request) -> aiohttp.web.StreamResponse:
        assert self.session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "authorization")}
        headers["Authorization"] = f"Bearer {self.token}"
        async with self.session.request(request.method, self.upstream + request.path_qs, headers=headers,
                                        data=await request.read()) as upstream:
            response = aiohttp.web.StreamResponse(status=upstream.status, headers={
                k: v for k, v in upstream.headers.items() if k.lower() not in ("content-length", "transfer-encoding")})
            await response.prepare(request)
            with contextlib.suppress(ConnectionError):
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
            return response
