"""The e2e harness: a World (cluster, kubelet, kubectl, S3) and how to read a FineTuneJob's life from API objects.

Everything here talks to the cluster through API objects (and kubectl), never to operator internals.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from hub_server import SMOLLM_REPO
from kt_cluster import NS, Cluster, eventually
from kt_kubectl import Kubectl
from kt_kubelet import Kubelet

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "data" / "pebblewave-support.jsonl"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
MAX_STEPS, CHECKPOINT_STEPS = 4, 2
MODEL = SMOLLM_REPO  # a made-up hub id: planned from its config.json on the test hub, downloaded from there
TINY = "kubetune-test/tiny-llama"  # the tiny random Llama (tests/tiny_llama.py), published by the `tiny_repo` fixture
MODEL_CACHE_CLAIM = "model-cache"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class World:
    cluster: Cluster
    kubelet: Kubelet
    kubectl: Kubectl
    s3: Any
    bucket: str
    s3_endpoint: str
    port: int
    folder: Path
    model: dict[str, Any]
    hub: Any
    pollers: list[asyncio.Task[None]] = field(default_factory=list)
    served: dict[str, list[str]] = field(default_factory=dict)
    operator_settings: dict[str, Any] = field(default_factory=dict)  # more Settings for start_operator

    def manifest(self, name: str, resources: dict[str, Any] | None = None, serving: dict[str, Any] | None = None,
                 evaluation: dict[str, Any] | None = None, **training: Any) -> str:
        return yaml.safe_dump({
            "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": name, "namespace": NS},
            "spec": {
                "model": self.model,
                "dataset": {"source": f"s3://{self.bucket}/data/train.jsonl", "format": "chat",
                            **({"evalSource": f"s3://{self.bucket}/data/eval.jsonl"} if evaluation is not None
                               else {})},
                "method": "qlora",
                "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
                "training": {"maxSteps": MAX_STEPS, "checkpointSteps": CHECKPOINT_STEPS, "loggingSteps": 1,
                             "microBatchSize": 2, "gradientAccumulationSteps": 1, "maxSeqLength": 128,
                             "learningRate": 1e-3, "warmupRatio": 0.0, "seed": 7, **training},
                "output": {"uri": f"s3://{self.bucket}/adapters/{name}/", "endpointUrl": self.s3_endpoint,
                           "credentialsSecret": "s3-creds", **({"serving": serving} if serving else {})},
                **({"resources": resources} if resources else {}),
                **({"evaluation": evaluation} if evaluation is not None else {}),
            },
        }, sort_keys=False)

    async def start_operator(self) -> None:
        """The operator as the chart configures it: the test hub as `hub.endpoint`, the model cache PVC."""
        await self.cluster.start_operator(**{"trainer_port": self.port, "poll_interval": 0.5,
                                             "hf_endpoint": self.hub.url, "model_cache_claim": MODEL_CACHE_CLAIM,
                                             **self.operator_settings})

    async def apply(self, name: str, resources: dict[str, Any] | None = None, serving: dict[str, Any] | None = None,
                    evaluation: dict[str, Any] | None = None, **training: Any) -> None:
        """`evaluation`: spec.evaluation, judged on data/eval.jsonl (dataset.evalSource): the training rows stay
        those of the runs without it, so their adapters compare."""
        path = self.folder / f"{name}.yaml"
        path.write_text(self.manifest(name, resources, serving, evaluation, **training))
        result = await self.kubectl("apply", "-f", str(path))
        assert result.code == 0 and result.out.strip() == f"finetunejob.kubetune.io/{name} created", result

    # --- reading the cluster (API objects only) -----------------------------------------------------

    def ftj(self, name: str) -> dict[str, Any]:
        return self.cluster.ftj(name)

    def history(self, name: str) -> list[dict[str, Any]]:
        """Every status the FineTuneJob had, in order (from the emulator's watch log)."""
        key = self.cluster.api.kind_of("finetunejobs").key
        return [dict(e["object"].get("status") or {}) for _, e in self.cluster.api.log[key]
                if e["object"]["metadata"]["name"] == name and e["object"]["metadata"]["namespace"] == NS]

    def jobs(self, name: str) -> list[dict[str, Any]]:
        uid = self.ftj(name)["metadata"]["uid"]
        return [j for j in self.cluster.api.items("jobs", NS)
                if any(r.get("uid") == uid for r in j["metadata"].get("ownerReferences") or [])]

    def pods_seen(self, job_names: set[str] | None = None) -> dict[str, dict[str, Any]]:
        """Every trainer pod ever created (by name -> its last state), deleted ones included."""
        key = self.cluster.api.kind_of("pods").key
        seen: dict[str, dict[str, Any]] = {}
        for _, event in self.cluster.api.log[key]:
            obj = event["object"]
            owner = (obj["metadata"].get("labels") or {}).get("batch.kubernetes.io/job-name")
            if owner and (job_names is None or owner in job_names):
                seen[obj["metadata"]["name"]] = obj
        return seen

    def pod_seconds(self, pod: str) -> float:
        """From the pod's creation to its Succeeded phase, as the API server saw them."""
        key = (self.cluster.api.kind_of("pods").key, NS, pod)
        return self.cluster.api.phase_at[(key, "Succeeded")] - self.cluster.api.created_at[key]

    def events(self, name: str) -> list[dict[str, Any]]:
        return self.cluster.events(name)

    def trainer_log(self, pod: str) -> str:
        return self.kubelet.log(NS, pod)

    async def wait_phase(self, name: str, phase: str, timeout: float = 420) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            status = self.cluster.status(name)
            if status.get("phase") == "Failed" and phase != "Failed":
                raise AssertionError(f"{name} failed: {status.get('message')}\n{self.logs()}")
            return status if status.get("phase") == phase else None
        return dict(await eventually(check, timeout, f"{name} to reach {phase}"))

    async def wait_checkpoint(self, name: str, step: int, timeout: float = 300) -> None:
        def check() -> bool:
            listed = self.s3.list_objects_v2(Bucket=self.bucket, Prefix=f"adapters/{name}/checkpoints/")
            return any(o["Key"].endswith(f"step-{step:08d}/COMPLETE") for o in listed.get("Contents", []))
        await eventually(check, timeout, f"checkpoint {step} of {name} in S3")

    def logs(self) -> str:
        folder = self.kubelet.root / "pods"
        return "\n".join(f"--- {p.parent.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(folder.glob("*/*.log"))) if folder.exists() else "(no pods)"

    def watch_trainer(self) -> None:
        """Scrape the trainer's /status and /metrics on 127.0.0.1 whenever a pod serves them (as Prometheus and
        the operator would); what answered is kept in `served`."""
        async def poll() -> None:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
                while True:
                    for path in ("/status", "/metrics"):
                        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                            async with session.get(f"http://127.0.0.1:{self.port}{path}") as response:
                                if response.status == 200:
                                    self.served.setdefault(path, []).append(await response.text())
                    await asyncio.sleep(0.3)
        self.pollers.append(asyncio.create_task(poll()))
