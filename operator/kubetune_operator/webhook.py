"""The optional validating admission webhook: what the CRD's schema and CEL rules cannot know.

The CRD refuses every bad value the spec model can state by itself (kubetune.crd, kubetune.cel). What
is left depends on the GPU catalog, which the platform can extend (the chart's `gpuCatalog`): an unknown
`gpuClass` / `maxGpuClass`, or a pinned class too small for the job. With `webhook.enabled` the chart
runs this check at `kubectl apply` time, through kopf's `@kopf.on.validate` and the same parse_spec and
planner the operator runs later. Certificates come from cert-manager (the chart's Certificate, mounted
at KUBETUNE_WEBHOOK_CERT_DIR); the chart's ValidatingWebhookConfiguration points at the operator's
Service, so the operator needs no rights on webhook configurations.

The check does no I/O: a model whose architecture is not in the built-in catalog (its config.json sits
in S3 or on a volume) is admitted here and planned by the operator, which reports problems in status.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kopf

from kubetune.errors import SpecError
from kubetune.planning.cache import PlanCache
from kubetune.planning.gpus import GpuCatalog
from kubetune.planning.models import resolve_architecture
from kubetune.spec import API_GROUP, API_VERSION, PLURAL, parse_spec

WEBHOOK_ID = "validate.finetunejobs.kubetune.io"  # also the URL path: https://<service>/<WEBHOOK_ID>


def review(spec: Any, catalog: GpuCatalog, plans: PlanCache | None = None) -> list[str]:
    """The problems that keep a FineTuneJob spec out of the cluster, one line per field; [] admits. `plans`: the
    operator's plan cache (a spec admitted again, or planned by the operator already, is not planned again)."""
    try:
        parsed = parse_spec(spec)
    except SpecError as exc:
        return list(exc.problems)
    problems: list[str] = []
    for name, path in ((parsed.resources.gpu_class, "spec.resources.gpuClass"),
                       (parsed.resources.max_gpu_class, "spec.resources.maxGpuClass")):
        if name and name != "auto":
            try:
                catalog.get(name, path)
            except SpecError as exc:
                problems.extend(exc.problems)
    if problems:
        return problems
    try:
        arch = resolve_architecture(parsed.model.name, parsed.model.source)  # no remote reads at admission
    except SpecError:
        return []  # the operator reads config.json and plans it; nothing the catalog can say yet
    try:
        (PlanCache(1) if plans is None else plans).plan(parsed, arch, catalog)
    except SpecError as exc:
        return list(exc.problems)
    return []


@dataclass(frozen=True)
class WebhookSettings:
    port: int
    cert_dir: Path
    addr: str = "0.0.0.0"  # the Service reaches the pod on its IP

    @classmethod
    def from_env(cls) -> WebhookSettings | None:
        """None unless KUBETUNE_WEBHOOK_PORT is set (the chart sets it with webhook.enabled)."""
        port = os.environ.get("KUBETUNE_WEBHOOK_PORT")
        if not port:
            return None
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise SpecError(f"KUBETUNE_WEBHOOK_PORT: must be a port number (1-65535), got {port!r}")
        return cls(int(port), Path(os.environ.get("KUBETUNE_WEBHOOK_CERT_DIR", "/var/run/kubetune/webhook")),
                   os.environ.get("KUBETUNE_WEBHOOK_ADDR", cls.addr))

    def server(self) -> kopf.WebhookServer:
        return kopf.WebhookServer(addr=self.addr, port=self.port, certfile=str(self.cert_dir / "tls.crt"),
                                  pkeyfile=str(self.cert_dir / "tls.key"), cafile=str(self.cert_dir / "ca.crt"))


def install(registry: kopf.OperatorRegistry, catalog: GpuCatalog, settings: WebhookSettings | None,
            plans: PlanCache | None = None) -> None:
    """Serve the validating webhook from this operator when settings are given (else do nothing)."""
    if settings is None:
        return

    @kopf.on.startup(registry=registry)
    def serve_admission(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.admission.server = webhook_settings.server()
        settings.admission.managed = None  # the chart owns the ValidatingWebhookConfiguration

    webhook_settings = settings

    @kopf.on.validate(API_GROUP, API_VERSION, PLURAL, id=WEBHOOK_ID, registry=registry,
                      operations=["CREATE", "UPDATE"])
    def validate(spec: kopf.Spec, **_: Any) -> None:
        problems = review(dict(spec), catalog, plans)
        if problems:
            raise kopf.AdmissionError("\n".join(problems), code=422)
