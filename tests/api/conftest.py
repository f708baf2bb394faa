"""The REST API served by uvicorn on 127.0.0.1, in front of the Kubernetes emulator (also over HTTP)."""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import kmock
import pytest
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))
from kt_emulator import KubeEmulator  # the operator suite's emulator: uids, resourceVersion, status, GC

from kubetune.api import ApiSettings, create_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Stack:
    kube: KubeEmulator
    kube_url: str
    client: httpx.AsyncClient


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    async with KubeEmulator() as kube, kmock.Server(kube) as server:
        kube_url = str(server.url).rstrip("/")
        port = free_port()
        config = uvicorn.Config(create_app(ApiSettings(kube_url=kube_url)), host="127.0.0.1", port=port,
                                log_level="warning", lifespan="on")
        api = uvicorn.Server(config)
        thread = threading.Thread(target=api.run, daemon=True)
        thread.start()
        for _ in range(200):
            if api.started:
                break
            await asyncio.sleep(0.02)
        assert api.started, "the API server did not start"
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}",
                                         headers={"Authorization": "Bearer team-a-token"}, timeout=10) as client:
                yield Stack(kube, kube_url, client)
        finally:
            api.should_exit = True
            await asyncio.to_thread(thread.join, 10)
