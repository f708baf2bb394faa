"""Fixtures for the whole-life tests: kubectl -> the emulator -> the real kopf operator -> the test kubelet
running the real trainer (`python -m kubetune_trainer`) -> the test hub and moto's S3."""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "cluster"))
sys.path.insert(0, str(Path(__file__).parents[1] / "operator"))

from hub_server import HubServer, model_files, smollm_model_dir
from kt_cluster import NS, Cluster, cluster
from kt_kubectl import Kubectl
from kt_kubelet import Kubelet
from kt_life import CREDENTIALS, DATA, MODEL, MODEL_CACHE_CLAIM, TINY, World, free_port
from tiny_llama import tiny_llama

__all__ = ["cluster"]


@pytest.fixture(scope="session")
def s3(s3_endpoint: str) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", **{
        k.lower(): v for k, v in CREDENTIALS.items()})


@pytest.fixture
def bucket(s3: Any, request: pytest.FixtureRequest) -> str:
    test = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower())[:40].strip("-")  # a bucket name's characters
    name = f"e2e-{test}-{time.monotonic_ns() % 100000}"
    s3.create_bucket(Bucket=name)
    s3.upload_file(str(DATA), name, "data/train.jsonl")
    s3.put_object(Bucket=name, Key="data/eval.jsonl", Body="".join(DATA.read_text().splitlines(keepends=True)[-8:]))
    return name


@pytest.fixture(scope="session")
def tiny_repo(hub_server: HubServer, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer random Llama with SmolLM2's vocabulary and tokenizer, on the test hub (`kt_life.TINY`)."""
    from transformers import AutoTokenizer

    folder = tiny_llama(tmp_path_factory.mktemp("tiny-llama"), AutoTokenizer.from_pretrained(smollm_model_dir()))
    hub_server.publish(TINY, model_files(folder, decoys=False))
    return TINY


@pytest.fixture
def model(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The FineTuneJob's base model on the test hub: SmolLM2-135M, or the tiny Llama for a test parametrized with
    `@pytest.mark.parametrize("model", ["tiny"], indirect=True)`, where the life, not the model, is the point (a
    SmolLM2 pod costs this 2-core machine ~15 s more CPU than a tiny one)."""
    if getattr(request, "param", None) == "tiny":
        return {"name": request.getfixturevalue("tiny_repo")}
    return {"name": MODEL}


@pytest.fixture
async def world(cluster: Cluster, tmp_path: Path, s3: Any, s3_endpoint: str, bucket: str, hub: HubServer,
                model: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[World]:
    # The operator (in-process) plans a hub id the catalog does not know from its config.json on the hub the
    # chart's hub.endpoint names (KUBETUNE_HF_ENDPOINT in the operator's pod).
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    await cluster.api.put_object("persistentvolumeclaims", {  # the chart's modelCache PVC, shared by attempts
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": MODEL_CACHE_CLAIM, "namespace": NS},
        "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "10Gi"}}}})
    await cluster.api.put_object("secrets", {"apiVersion": "v1", "kind": "Secret",
                                             "metadata": {"name": "s3-creds", "namespace": NS},
                                             "stringData": CREDENTIALS})
    image_env = {  # what the trainer image would bake in
        "OMP_NUM_THREADS": "1",  # 2 cores shared: spinning OpenMP threads would fight
        "KUBETUNE_CACHE_DIR": os.environ.get("KUBETUNE_CACHE_DIR", str(Path.home() / ".cache" / "kubetune")),
        "KUBETUNE_LOG_FORMAT": "json", "PYTHONUNBUFFERED": "1",
        # these "GPU nodes" are this CPU machine and say so (as --device cpu would): the operator's config names the
        # plan's device, cuda, and a pod without usable CUDA exits 5 (tests/trainer/test_gpu_branches.py)
        "KUBETUNE_DEVICE": "cpu",
    }
    port = free_port()
    async with Kubelet(cluster.api, tmp_path / "kubelet", image_env=image_env) as kubelet:
        world = World(cluster, kubelet, Kubectl(cluster.url, tmp_path / "kubectl", namespace=NS), s3, bucket,
                      s3_endpoint, port, tmp_path, model, hub)
        await world.start_operator()
        try:
            yield world
        finally:
            for task in world.pollers:
                task.cancel()
            for operator in list(cluster.operators):
                await operator.stop()
            cluster.operators.clear()
    assert not kubelet.errors, kubelet.errors
