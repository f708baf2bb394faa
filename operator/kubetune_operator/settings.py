"""Operator settings: read once from the environment (the Helm chart sets these), overridable in tests."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kubetune import wire
from kubetune.planning.budget import quantity_bytes


def _env(name: str, default: str) -> str:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def _env_bool(name: str, default: bool) -> bool:
    return _env(name, "true" if default else "false").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Settings:
    trainer_image: str = "ghcr.io/kubetune/trainer:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    namespaces: tuple[str, ...] = ()  # empty: cluster-wide
    peering: str | None = None  # kopf peering name for HA (None: standalone)
    metrics_port: int = 8080
    gpu_catalog: Path | None = None  # KUBETUNE_GPU_CATALOG (None: built-in catalog)
    provisionable_gpu_classes: tuple[str, ...] = ()  # classes whose node pools scale up from zero
    default_s3_endpoint: str | None = None  # used when spec.output.endpointUrl is unset
    hf_endpoint: str | None = None  # HF_ENDPOINT for trainers: a hub mirror or proxy (None: huggingface.co)
    hf_token_secret: str | None = None  # "name" or "name/key": the hub token when spec.model.tokenSecret is unset
    model_cache_claim: str | None = None  # a ReadWriteMany PVC shared by trainer pods (None: an emptyDir each)
    trainer_port: int = wire.TRAINER_PORT  # the trainer's /metrics, /healthz, /readyz, /status port
    rendezvous_port: int = 29400  # torchrun's c10d rendezvous on pod 0 of a multi-node attempt
    cpu_per_gpu: str = "3"
    memory_per_gpu: str = "12Gi"
    shm_size: str = "8Gi"
    backoff_limit: int = 3  # pod failures (not disruptions) the Job tolerates before it fails
    poll_interval: float = 10.0  # seconds between status polls (Job/pod outcome and the trainer's /status)
    wait_for_nodes: bool = True  # no node of the class: stay Pending (False: create the Job; autoscalers add nodes)
    run_as_user: int = 10001  # the trainer image's user (Dockerfile.trainer), one uid everywhere
    scratch_size: str = "20Gi"  # sizeLimit of the trainer's writable /tmp (the root filesystem is read-only)
    extra_labels: dict[str, str] = field(default_factory=dict)
    quotas_file: str | None = None  # KUBETUNE_QUOTAS: the mounted quotas ConfigMap (kubetune.quota); None: none

    def __post_init__(self) -> None:
        try:
            quantity_bytes(self.memory_per_gpu)
        except ValueError as exc:
            raise ValueError(f"memory_per_gpu (KUBETUNE_MEMORY_PER_GPU, the chart's trainer.memoryPerGpu): {exc}") \
                from None

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        catalog = os.environ.get("KUBETUNE_GPU_CATALOG")
        namespaces = tuple(n for n in _env("KUBETUNE_NAMESPACES", "").replace(",", " ").split() if n)
        settings = cls(
            trainer_image=_env("KUBETUNE_TRAINER_IMAGE", cls.trainer_image),
            image_pull_policy=_env("KUBETUNE_IMAGE_PULL_POLICY", cls.image_pull_policy),
            namespaces=namespaces,
            peering=os.environ.get("KUBETUNE_PEERING") or None,
            metrics_port=int(_env(wire.ENV_OPERATOR_METRICS_PORT, str(cls.metrics_port))),
            gpu_catalog=Path(catalog) if catalog else None,
            provisionable_gpu_classes=tuple(
                n for n in _env("KUBETUNE_PROVISIONABLE_GPU_CLASSES", "").replace(",", " ").split() if n),
            default_s3_endpoint=os.environ.get("KUBETUNE_S3_ENDPOINT") or None,
            hf_endpoint=os.environ.get("KUBETUNE_HF_ENDPOINT") or None,
            hf_token_secret=os.environ.get("KUBETUNE_HF_TOKEN_SECRET") or None,
            model_cache_claim=os.environ.get("KUBETUNE_MODEL_CACHE_PVC") or None,
            trainer_port=int(_env(wire.ENV_TRAINER_PORT, str(cls.trainer_port))),
            rendezvous_port=int(_env("KUBETUNE_RENDEZVOUS_PORT", str(cls.rendezvous_port))),
            cpu_per_gpu=_env("KUBETUNE_CPU_PER_GPU", cls.cpu_per_gpu),
            memory_per_gpu=_env("KUBETUNE_MEMORY_PER_GPU", cls.memory_per_gpu),
            shm_size=_env("KUBETUNE_SHM_SIZE", cls.shm_size),
            scratch_size=_env("KUBETUNE_SCRATCH_SIZE", cls.scratch_size),
            backoff_limit=int(_env("KUBETUNE_BACKOFF_LIMIT", str(cls.backoff_limit))),
            poll_interval=float(_env("KUBETUNE_POLL_INTERVAL", str(cls.poll_interval))),
            wait_for_nodes=_env_bool("KUBETUNE_WAIT_FOR_NODES", cls.wait_for_nodes),
            quotas_file=os.environ.get("KUBETUNE_QUOTAS") or None,
        )
        return replace(settings, **overrides)
