"""The API's settings, read once from the environment (the chart sets them)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kubetune.errors import KubetuneError

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
AUTH_MODES = ("passthrough", "serviceaccount")


@dataclass(frozen=True)
class ApiSettings:
    kube_url: str = "https://kubernetes.default.svc"
    ca_file: str | None = None  # the API server's CA bundle (kube-root-ca.crt); None: the system's CAs
    token_file: str | None = None  # the API pod's own token (serviceaccount mode); re-read as it rotates
    auth: Literal["passthrough", "serviceaccount"] = "passthrough"
    timeout: float = 10.0  # per call to the Kubernetes API
    max_body_bytes: int = 1 << 20  # 413 above this
    plan_timeout: float = 20.0  # planning (S3 and file reads included) gives up after this: 504
    plan_concurrency: int = 4  # plans in flight at once; one more is 503
    review_ttl: float = 10.0  # seconds a TokenReview / SubjectAccessReview answer is reused
    sse_heartbeat: float = 15.0  # seconds between `: ping` comment lines on an idle event stream
    sse_replay: int = 1000  # messages each namespace keeps for Last-Event-ID resumes
    sse_linger: float = 30.0  # seconds a namespace's watch outlives its last listener (quick reconnects)
    sse_queue: int = 1000  # messages one slow listener may fall behind before its stream is closed
    namespaces: tuple[str, ...] = ()  # candidates for GET /v1/namespaces (empty: list the cluster's)
    quotas_file: str | None = None  # the quotas ConfigMap, mounted (kubetune.quota); None: no quotas
    prometheus_url: str | None = None  # loss curves from Prometheus (GET .../loss); None: status.lossHistory

    def __post_init__(self) -> None:
        if self.auth not in AUTH_MODES:
            raise KubetuneError(f"KUBETUNE_API_AUTH: must be one of: {', '.join(AUTH_MODES)}; got {self.auth!r}")

    @classmethod
    def from_env(cls) -> ApiSettings:
        env = os.environ
        ca = env.get("KUBETUNE_KUBE_CA") or (
            str(SERVICE_ACCOUNT / "ca.crt") if (SERVICE_ACCOUNT / "ca.crt").exists() else None)
        token = env.get("KUBETUNE_KUBE_TOKEN_FILE") or (
            str(SERVICE_ACCOUNT / "token") if (SERVICE_ACCOUNT / "token").exists() else None)

        def number(name: str, default: float, low: float) -> float:
            raw = env.get(name)
            if raw is None:
                return default
            try:
                value = float(raw)
            except ValueError:
                value = low - 1
            if value < low:
                raise KubetuneError(f"{name}: must be a number >= {low:g}; got {raw!r}")
            return value

        return cls(
            kube_url=env.get("KUBETUNE_KUBE_URL", cls.kube_url), ca_file=ca, token_file=token,
            auth=env.get("KUBETUNE_API_AUTH", "passthrough"),  # type: ignore[arg-type]  # checked in __post_init__
            max_body_bytes=int(number("KUBETUNE_API_MAX_BODY_BYTES", cls.max_body_bytes, 1024)),
            plan_timeout=number("KUBETUNE_API_PLAN_TIMEOUT", cls.plan_timeout, 0.1),
            plan_concurrency=int(number("KUBETUNE_API_PLAN_CONCURRENCY", cls.plan_concurrency, 1)),
            review_ttl=number("KUBETUNE_API_REVIEW_TTL", cls.review_ttl, 0),
            sse_heartbeat=number("KUBETUNE_API_SSE_HEARTBEAT", cls.sse_heartbeat, 0.05),
            sse_replay=int(number("KUBETUNE_API_SSE_REPLAY", cls.sse_replay, 1)),
            sse_linger=number("KUBETUNE_API_SSE_LINGER", cls.sse_linger, 0),
            namespaces=tuple(n for n in env.get("KUBETUNE_API_NAMESPACES", "").replace(",", " ").split() if n),
            quotas_file=env.get("KUBETUNE_QUOTAS") or None,
            prometheus_url=env.get("KUBETUNE_PROMETHEUS_URL") or None,
        )
