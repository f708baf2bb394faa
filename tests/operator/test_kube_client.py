"""The operator's own API client (kube.py) against a real HTTP server on 127.0.0.1: how many connections a
burst of writes opens, and that every write still lands."""

from __future__ import annotations

import asyncio
from typing import Any

import kopf
from aiohttp import web
from kubetune_operator.kube import CONNECTIONS, Kube

NS = "team-a"


class CountingServer:
    """Answers ConfigMap POSTs after a short pause, counting requests in flight (on HTTP/1.1 each holds its own
    connection) and the client ports they came from (each port one connection)."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.most_in_flight = 0
        self.ports: set[int] = set()
        self.created: list[str] = []

    async def create(self, request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if peer:
            self.ports.add(peer[1])
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            body: dict[str, Any] = await request.json()
            await asyncio.sleep(0.1)
            self.created.append(body["metadata"]["name"])
            return web.json_response(body, status=201)
        finally:
            self.in_flight -= 1


def config_map(i: int) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"cm-{i}", "namespace": NS}, "data": {}}


async def test_a_burst_of_writes_holds_at_most_the_connection_limit_and_all_land() -> None:
    server = CountingServer()
    app = web.Application()
    app.router.add_post(f"/api/v1/namespaces/{NS}/configmaps", server.create)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    kube = Kube(kopf.ConnectionInfo(server=f"http://127.0.0.1:{port}", insecure=True))
    try:
        burst = 5 * CONNECTIONS
        created = await asyncio.gather(*(kube.create_or_adopt(config_map(i), "uid-1") for i in range(burst)))
    finally:
        await kube.close()
        await runner.cleanup()
    assert all(created) and sorted(server.created) == sorted(f"cm-{i}" for i in range(burst))
    assert server.most_in_flight <= CONNECTIONS, server.most_in_flight
    assert len(server.ports) <= CONNECTIONS, len(server.ports)
    assert server.most_in_flight > CONNECTIONS // 2  # the connections are used at once, not one by one
