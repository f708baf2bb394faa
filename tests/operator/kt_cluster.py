"""Test harness: kmock's Kubernetes emulator over HTTP on 127.0.0.1, the real kopf operator in-process,
a GPU cluster (Nodes with GFD/EKS/GKE labels), a kubelet stand-in that runs pods by writing their status,
and a trainer stand-in serving /status over HTTP."""

from __future__ import annotations

import asyncio
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import aiohttp.web
import kmock
import kopf
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from kt_emulator import KubeEmulator
from kubetune_operator.main import build_operator
from kubetune_operator.metrics import Metrics
from kubetune_operator.settings import Settings

from kubetune.contracts import TrainerPhase, TrainerStatus

NS = "ml"

# One node per class the issue names, labelled the way each provider labels them.
CLUSTER = [
    ("gpu-a10g-1", {"nvidia.com/gpu.product": "NVIDIA-A10G"}, 1),
    ("gpu-l4-1", {"cloud.google.com/gke-accelerator": "nvidia-l4"}, 1),
    ("gpu-a100-80-1", {"karpenter.k8s.aws/instance-gpu-name": "a100",
                       "karpenter.k8s.aws/instance-gpu-memory": "81920"}, 8),
    ("gpu-h100-1", {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}, 8),
    ("cpu-1", {"kubernetes.io/os": "linux"}, 0),
]


def node(name: str, labels: dict[str, str], gpus: int) -> dict[str, Any]:
    allocatable = {"cpu": "32", "memory": "256Gi"} | ({"nvidia.com/gpu": str(gpus)} if gpus else {})
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, **labels}},
        "spec": {"taints": [{"key": "nvidia.com/gpu", "effect": "NoSchedule"}] if gpus else []},
        "status": {"allocatable": allocatable, "capacity": allocatable,
                   "conditions": [{"type": "Ready", "status": "True"}]},
    }


def finetunejob(name: str, model: str = "meta-llama/Llama-3.1-8B-Instruct", *, labels: dict[str, str] | None = None,
                **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": {"name": model},
        "dataset": {"source": "s3://datasets/support/train.jsonl", "format": "chat"},
        "training": {"maxSteps": 500},
        "output": {"uri": f"s3://adapters/{name}/", "credentialsSecret": "s3-creds"},
    }
    for key, value in spec.items():
        body[key] = {**body.get(key, {}), **value} if isinstance(value, dict) else value
    return {
        "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": NS, "labels": labels or {}},
        "spec": body,
    }


async def eventually(check: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    """Poll `check` (sync or async) until it returns something truthy."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: Any = None
    while loop.time() < deadline:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")


@dataclass
class Cluster:
    api: KubeEmulator
    url: str
    operators: list[RunningOperator] = field(default_factory=list)

    async def add_namespaces(self, *names: str) -> None:
        for name in names:
            await self.api.put_object("namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                     "metadata": {"name": name}})

    async def add_nodes(self, nodes: list[tuple[str, dict[str, str], int]] = CLUSTER) -> None:
        for name, labels, gpus in nodes:
            await self.api.put_object("nodes", node(name, labels, gpus))

    async def apply(self, body: dict[str, Any]) -> dict[str, Any]:
        async with aiohttp.ClientSession() as session:
            url = f"{self.url}/apis/kubetune.io/v1alpha1/namespaces/{body['metadata']['namespace']}/finetunejobs"
            async with session.post(url, json=body) as response:
                assert response.status == 201, await response.text()
                return dict(await response.json())

    async def request(self, method: str, path: str, body: Any = None, content_type: str | None = None) -> Any:
        headers = {"Content-Type": content_type} if content_type else {}
        async with aiohttp.ClientSession() as session, \
                session.request(method, f"{self.url}{path}", json=body, headers=headers) as response:
            return response.status, await response.json()

    def ftj(self, name: str) -> dict[str, Any]:
        return self.api.read("finetunejobs", NS, name) or {}

    def status(self, name: str) -> dict[str, Any]:
        return dict(self.ftj(name).get("status") or {})

    def jobs(self, selector: str = "") -> list[dict[str, Any]]:
        return self.api.items("jobs", NS, selector)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.api.items("events", NS) if (e.get("involvedObject") or {}).get("name") == name]

    async def wait_phase(self, name: str, phase: str, timeout: float = 15.0) -> dict[str, Any]:
        return dict(await eventually(lambda: self.status(name) if self.status(name).get("phase") == phase else None,
                                     timeout, f"{name} to reach {phase} (now {self.status(name)})"))

    async def start_operator(self, priority: int = 0, **overrides: Any) -> RunningOperator:
        operator = RunningOperator(self.url, Settings(**{"poll_interval": 0.3, "metrics_port": 0, **overrides}),
                                   priority)
        await operator.start()
        self.operators.append(operator)
        return operator

    # --- the kubelet and the job controller, played by the test --------------------------------------

    async def run_pod(self, job: dict[str, Any], node_name: str, port: int = 8000) -> dict[str, Any]:
        template = job["spec"]["template"]
        name = f"{job['metadata']['name']}-{uuid.uuid4().hex[:5]}"
        pod = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": name, "namespace": NS,
                "labels": {**template["metadata"]["labels"], "batch.kubernetes.io/job-name": job["metadata"]["name"]},
                "annotations": {**template["metadata"]["annotations"], "prometheus.io/port": str(port)},
                "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": job["metadata"]["name"],
                                     "uid": job["metadata"]["uid"], "controller": True}],
            },
            "spec": {**template["spec"], "nodeName": node_name},
            "status": {"phase": "Running", "podIP": "127.0.0.1",
                       "containerStatuses": [{"name": "trainer", "ready": True, "restartCount": 0,
                                              "state": {"running": {"startedAt": "2026-11-30T08:00:00Z"}}}]},
        }
        return await self.api.put_object("pods", pod)

    async def end_pod(self, pod: dict[str, Any], exit_code: int, message: str = "", reason: str = "") -> None:
        terminated = {"exitCode": exit_code, "reason": reason or ("Completed" if exit_code == 0 else "Error"),
                      "message": message, "finishedAt": "2026-11-30T08:10:00Z"}
        await self.api.patch_object("pods", NS, pod["metadata"]["name"], {"status": {
            "phase": "Succeeded" if exit_code == 0 else "Failed",
            "containerStatuses": [{"name": "trainer", "ready": False, "restartCount": 0,
                                   "state": {"terminated": terminated}}],
        }})

    async def finish_job(self, job_name: str, condition: str, reason: str = "") -> None:
        await self.api.patch_object("jobs", NS, job_name, {"status": {"conditions": [
            {"type": condition, "status": "True", "reason": reason or condition}]}})


class RunningOperator:
    """The real kopf operator with kubetune's registry, logged in to the emulator over HTTP.

    It runs in its own thread and event loop, as a separate process would: kopf cancels every task of
    its loop on exit, and the emulator must outlive it.
    """

    def __init__(self, url: str, settings: Settings, priority: int = 0) -> None:
        self.url = url
        self.priority = priority
        self.settings = settings
        self.metrics = Metrics()
        self.thread: threading.Thread | None = None
        self.stop_flag = threading.Event()
        self.ready = threading.Event()
        self.error: BaseException | None = None

    def _main(self) -> None:
        url = self.url

        def login(**_: Any) -> kopf.ConnectionInfo:
            return kopf.ConnectionInfo(server=url, insecure=True, default_namespace=NS)

        registry, memo = build_operator(self.settings, self.metrics, login=login)

        @kopf.on.startup(registry=registry)
        def fast_retries(settings: kopf.OperatorSettings, **_: Any) -> None:
            settings.networking.error_backoffs = (0.05, 0.1, 0.2, 0.4, 0.8)
            settings.watching.reconnect_backoff = 0.1
            settings.queueing.exit_timeout = 2

        try:
            asyncio.run(kopf.operator(registry=registry, memo=memo, clusterwide=True,
                                      standalone=self.settings.peering is None,
                                      peering_name=self.settings.peering, priority=self.priority,
                                      identity=cast(Any, f"test-operator-{id(self)}"),  # one per operator
                                      stop_flag=self.stop_flag, ready_flag=self.ready))
        except BaseException as exc:  # reported by crashed() and stop()
            self.error = exc

    async def start(self) -> None:
        self.thread = threading.Thread(target=self._main, name="kopf-operator", daemon=True)
        self.thread.start()
        await eventually(lambda: self.ready.is_set() or self.error, 20, "the operator to start")
        if self.error:
            raise self.error

    async def stop(self) -> None:
        if self.thread is None:
            return
        self.stop_flag.set()
        thread, self.thread = self.thread, None
        await eventually(lambda: not thread.is_alive(), 20, "the operator to stop")
        if self.error and not isinstance(self.error, asyncio.CancelledError):
            raise self.error

    def crashed(self) -> BaseException | None:
        return self.error if self.thread is None or not self.thread.is_alive() else None


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    async with KubeEmulator() as api, kmock.Server(api) as server:
        world = Cluster(api, str(server.url).rstrip("/"))
        await world.add_namespaces("default", NS, "team-a", "kubetune-system")
        await world.add_nodes()
        try:
            yield world
        finally:
            for operator in world.operators:
                await operator.stop()


@pytest.fixture
async def trainer_standin() -> AsyncIterator[tuple[int, dict[str, Any]]]:
    """A trainer-like HTTP server on 127.0.0.1 serving /status (and /healthz, /metrics); mutate the dict."""
    state: dict[str, Any] = TrainerStatus(phase=TrainerPhase.TRAINING, step=120, total_steps=500, loss=1.2345,
                                          tokens_per_second=2100.0, eta_seconds=540.0,
                                          peak_memory_bytes=19_000_000_000).document()

    async def status_view(_: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.json_response(state)

    async def ok(_: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.json_response({"status": "ok"})

    app = aiohttp.web.Application()
    app.router.add_get("/status", status_view)
    app.router.add_get("/healthz", ok)
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield port, state
    finally:
        await runner.cleanup()


Waiter = Callable[..., Awaitable[Any]]
