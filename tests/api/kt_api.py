"""Helpers for the API tests: the REST API served by uvicorn on 127.0.0.1, in front of the Kubernetes emulator.

The emulator authenticates and authorizes like kube-apiserver (kt_auth.AuthEmulator): `team-a-token`
belongs to alice, who may do anything with finetunejobs in team-a only; `api-token` is the API pod's own
service account, which may create TokenReviews and SubjectAccessReviews and manage finetunejobs anywhere
(the chart's serviceaccount-mode ClusterRole). `stack` is plain HTTP in passthrough mode; `make_stack`
builds any mode, over HTTPS with a test CA when asked.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import kmock
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from kt_auth import AuthEmulator, Rule, User, make_ca, tls_server

from kubetune.api import ApiSettings, create_app

FTJ = "finetunejobs.kubetune.io"
ALICE = User("alice", ("team-a-devs", "system:authenticated"), uid="u-alice")
BOB = User("bob", ("team-b-devs", "system:authenticated"), uid="u-bob")
API_SA = User("system:serviceaccount:kubetune:kubetune-api", ("system:serviceaccounts", "system:authenticated"))
TOKENS = {"team-a-token": ALICE, "team-b-token": BOB, "api-token": API_SA}
RULES = [
    Rule("team-a-devs", "*", FTJ, "team-a"),
    Rule("team-b-devs", "get", FTJ, "team-b"),
    Rule("team-b-devs", "list", FTJ, "team-b"),
    Rule(API_SA.username, "create", "tokenreviews.authentication.k8s.io"),
    Rule(API_SA.username, "create", "subjectaccessreviews.authorization.k8s.io"),
    Rule(API_SA.username, "*", FTJ),
    Rule("team-a-devs", "list", "events", "team-a"),  # kubectl describe's Events, for the event streams
    Rule("team-a-devs", "watch", "events", "team-a"),
    Rule(API_SA.username, "list", "events"),
    Rule(API_SA.username, "watch", "events"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Stack:
    kube: AuthEmulator
    kube_url: str
    client: httpx.AsyncClient
    url: str
    settings: ApiSettings


@asynccontextmanager
async def serve_api(settings: ApiSettings) -> AsyncIterator[str]:
    port = free_port()
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    api = uvicorn.Server(config)
    thread = threading.Thread(target=api.run, daemon=True)
    thread.start()
    for _ in range(300):
        if api.started:
            break
        await asyncio.sleep(0.02)
    assert api.started, "the API server did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        api.should_exit = True
        await asyncio.to_thread(thread.join, 10)


MakeStack = Callable[..., AbstractAsyncContextManager[Stack]]


JOB: dict[str, Any] = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "support-bot"},
    "spec": {
        "model": {"name": "meta-llama/Llama-3.1-8B-Instruct"},
        "dataset": {"source": "s3://datasets/support/train.jsonl", "format": "chat"},
        "output": {"uri": "s3://adapters/support-bot/", "credentialsSecret": "s3-credentials"},
    },
}


def stack_factory(tmp_path: Path) -> MakeStack:
    @asynccontextmanager
    async def make(auth: str = "passthrough", tls: bool = False, ca_file: Path | None = None,
                   **overrides: Any) -> AsyncIterator[Stack]:
        token_file = tmp_path / "sa-token"
        token_file.write_text("api-token\n")
        async with AuthEmulator(tokens=dict(TOKENS), rules=list(RULES)) as kube:
            if tls:
                ca = make_ca(tmp_path / "ca")
                server: kmock.Server = tls_server(kube, ca.server_context())
            else:
                server = kmock.Server(kube)
            async with server:
                kube_url = f"{'https' if tls else 'http'}://127.0.0.1:{server.port}"
                settings = ApiSettings(kube_url=kube_url, auth=auth,  # type: ignore[arg-type]
                                       token_file=str(token_file) if auth == "serviceaccount" else None,
                                       ca_file=str(ca_file) if ca_file else (str(ca.ca_file) if tls else None))
                settings = replace(settings, **overrides)
                async with serve_api(settings) as url, httpx.AsyncClient(
                        base_url=url, headers={"Authorization": "Bearer team-a-token"}, timeout=15) as client:
                    yield Stack(kube, kube_url, client, url, settings)

    return make

