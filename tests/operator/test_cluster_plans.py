"""The two bugs of issue 10, as a user meets them: the operator plans onto the GPU classes the cluster really
has (nodes now, or provisionable), re-plans a Pending job when the inventory changes, and every transition
emits its Event, whether a watch event or the periodic timer decided it."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import kmock
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from kt_cluster import Cluster, eventually, finetunejob
from kt_emulator import KubeEmulator

# The cluster of the bug report: two A10G nodes (EKS g5) and one A100-80GB node (p4d), no L4.
G5_P4D = [
    ("g5-1", {"nvidia.com/gpu.product": "NVIDIA-A10G"}, 1),
    ("g5-2", {"karpenter.k8s.aws/instance-gpu-name": "a10g"}, 1),
    ("p4d-1", {"karpenter.k8s.aws/instance-gpu-name": "a100", "karpenter.k8s.aws/instance-gpu-memory": "81920"}, 8),
]
A10G_ONLY = G5_P4D[:1]


@pytest.fixture
async def bare() -> AsyncIterator[Cluster]:
    """The emulator with namespaces and no nodes: each test adds the cluster it needs."""
    async with KubeEmulator() as api, kmock.Server(api) as server:
        world = Cluster(api, str(server.url).rstrip("/"))
        await world.add_namespaces("default", "ml")
        try:
            yield world
        finally:
            for operator in world.operators:
                await operator.stop()


@pytest.mark.parametrize("model", ["meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.2-1B-Instruct"])
async def test_small_jobs_run_on_the_a10g_nodes_the_cluster_has(bare: Cluster, model: str) -> None:
    await bare.add_nodes(G5_P4D)
    await bare.start_operator()
    await bare.apply(finetunejob("small", model))
    status = await bare.wait_phase("small", "Queued")
    assert status["gpu"] == "A10G x1"
    assert "L4: no nodes in the cluster and not provisionable" in status["plan"]["reasons"]
    assert [j["metadata"]["name"] for j in bare.jobs()] == ["small-a1"]


async def test_a_provisionable_class_is_planned_and_its_job_created_for_the_autoscaler(bare: Cluster) -> None:
    await bare.add_nodes(G5_P4D)
    await bare.start_operator(provisionable_gpu_classes=("L4",))
    await bare.apply(finetunejob("scale-up"))
    status = await bare.wait_phase("scale-up", "Queued")
    assert status["gpu"] == "L4 x1"  # no L4 node yet: Karpenter adds one when the pod is pending
    assert [j["metadata"]["name"] for j in bare.jobs()] == ["scale-up-a1"]


async def test_a_pending_job_is_replanned_when_a_node_that_holds_it_joins(bare: Cluster) -> None:
    await bare.add_nodes(A10G_ONLY)
    await bare.start_operator()
    await bare.apply(finetunejob("big", "Qwen/Qwen2.5-14B", method="lora"))  # 16-bit 14B: more than an A10G holds
    status = await bare.wait_phase("big", "Pending")
    assert any("waits for a node of it" in r for r in status["plan"]["reasons"])
    assert bare.jobs() == []

    # A p4d node joins: nothing about the FineTuneJob changed, the timer re-plans it onto the new class.
    await bare.add_nodes(G5_P4D[2:])
    status = await bare.wait_phase("big", "Queued")
    assert status["gpu"] == "A100-80GB x1"
    assert [j["metadata"]["name"] for j in bare.jobs()] == ["big-a1"]
    # The periodic path decided this transition, and its Event is there.
    await eventually(lambda: any(e["reason"] == "JobCreated" for e in bare.events("big")), 5, "a JobCreated event")


async def test_events_from_the_watch_path_and_the_periodic_path(bare: Cluster) -> None:
    await bare.add_nodes(A10G_ONLY)
    await bare.start_operator()
    # Watch path: the FineTuneJob's own event decides Pending (pinned to a class the cluster lacks).
    await bare.apply(finetunejob("pinned", resources={"gpuClass": "A100-40GB"}))
    await bare.wait_phase("pinned", "Pending")
    await eventually(lambda: any(e["reason"] == "NoMatchingNodes" for e in bare.events("pinned")), 5,
                     "the NoMatchingNodes event (watch path)")
    # Periodic path: a node appears; no FineTuneJob or trainer pod event, only the timer sees it.
    await bare.add_nodes([("a100-40-1", {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB"}, 1)])
    await bare.wait_phase("pinned", "Queued")
    await eventually(lambda: any(e["reason"] == "JobCreated" for e in bare.events("pinned")), 5,
                     "the JobCreated event (periodic path)")
    # Periodic path again: the Job fails without a pod (deadline), which no pod event announces.
    await bare.finish_job("pinned-a1", "Failed", "DeadlineExceeded")
    await bare.wait_phase("pinned", "Failed")
    await eventually(lambda: any(e["reason"] == "TrainingFailed" and e["type"] == "Warning"
                                 for e in bare.events("pinned")), 5, "the TrainingFailed event (periodic path)")


@pytest.fixture
def moto_s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """moto's S3 server on 127.0.0.1; the environment points the operator's boto3 (kubetune/s3.py) at it."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(key, value)
    try:
        yield boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    finally:
        server.stop()


async def test_an_s3_model_source_is_planned_from_its_config_json(bare: Cluster, moto_s3: Any) -> None:
    config = {"model_type": "llama", "num_hidden_layers": 16, "hidden_size": 2048, "intermediate_size": 8192,
              "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
              "tie_word_embeddings": True, "max_position_embeddings": 131072}
    moto_s3.create_bucket(Bucket="models")
    moto_s3.put_object(Bucket="models", Key="llama-1b/config.json", Body=json.dumps(config).encode())
    await bare.add_nodes(G5_P4D)
    await bare.start_operator()
    body = finetunejob("from-s3")
    body["spec"]["model"] = {"source": "s3://models/llama-1b/"}
    await bare.apply(body)
    status = await bare.wait_phase("from-s3", "Queued")
    assert status["gpu"] == "A10G x1"
    assert status["plan"]["reasons"][0].startswith("s3://models/llama-1b/")


UNLISTED_1B = json.dumps({"model_type": "llama", "num_hidden_layers": 16, "hidden_size": 2048,
                          "intermediate_size": 8192, "num_attention_heads": 32, "num_key_value_heads": 8,
                          "vocab_size": 128256, "tie_word_embeddings": True}).encode()


@contextlib.contextmanager
def hub_answering(monkeypatch: pytest.MonkeyPatch, answer: Callable[[], int]) -> Iterator[None]:
    """A hub on 127.0.0.1 (HF_ENDPOINT for the operator's planner) whose config.json answers with the status
    `answer()` returns when asked (200: a Llama-1B-like config)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            code = answer() if self.path.endswith("/config.json") else 404
            body = UNLISTED_1B if code == 200 else b"{}"
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def slow_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """A hub whose config.json answers only once the test sets the returned Event (or after 8 s)."""
    answer = threading.Event()

    def slowly() -> int:
        answer.wait(8)
        return 200

    with hub_answering(monkeypatch, slowly):
        try:
            yield answer
        finally:
            answer.set()


async def test_a_hub_outage_keeps_the_job_pending_and_it_is_planned_when_the_hub_answers(
        bare: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """An uncatalogued hub id whose config.json the hub cannot serve (HTTP 503) is not an invalid spec: the job
    stays Pending (ModelConfigUnreachable, a Warning Event) and the timer plans it again once the hub answers."""
    down = threading.Event()
    down.set()
    with hub_answering(monkeypatch, lambda: 503 if down.is_set() else 200):
        await bare.add_nodes(G5_P4D)
        await bare.start_operator()
        await bare.apply(finetunejob("hub-down", "acme/unlisted-1b"))
        status = await bare.wait_phase("hub-down", "Pending")
        assert status["conditions"][0]["reason"] == "ModelConfigUnreachable", status
        assert "HTTP 503" in status["message"] and "planned again every" in status["message"]
        assert [e["type"] for e in bare.events("hub-down") if e["reason"] == "ModelConfigUnreachable"] == ["Warning"]
        down.clear()
        status = await bare.wait_phase("hub-down", "Queued")
    assert status["gpu"] == "A10G x1"


async def test_a_slow_hub_read_for_one_job_does_not_hold_up_the_others(bare: Cluster,
                                                                       slow_hub: threading.Event) -> None:
    """A hub id the catalog does not know is planned from its config.json on the hub, read in a thread: while
    the hub is slow to answer, the operator keeps launching other jobs."""
    await bare.add_nodes(G5_P4D)
    await bare.start_operator()
    await bare.apply(finetunejob("from-hub", "acme/unlisted-1b"))
    await asyncio.sleep(0.5)  # the hub read for from-hub is in flight
    await bare.apply(finetunejob("from-catalog", "meta-llama/Llama-3.2-1B-Instruct"))
    await bare.wait_phase("from-catalog", "Queued", timeout=6)
    assert bare.status("from-hub").get("phase") is None  # still waiting for the hub
    slow_hub.set()
    status = await bare.wait_phase("from-hub", "Queued")
    assert status["gpu"] == "A10G x1"
