"""Issue 11 finding 9, the catalog half: the operator's validating webhook refuses every bad spec value.

The real kopf operator (kubetune's registry, as `kubetune operator` builds it with KUBETUNE_WEBHOOK_PORT
set) serves AdmissionReview over HTTPS with a certificate from a test CA, as cert-manager would issue it;
the test posts AdmissionReviews the way kube-apiserver does and reads the verdicts.
"""

from __future__ import annotations

import asyncio
import copy
import socket
import ssl
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from kt_cluster import RunningOperator
from kubetune_operator.settings import Settings
from kubetune_operator.webhook import WEBHOOK_ID, WebhookSettings, review

from kubetune.planning.gpus import load_catalog

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS / "core"))
sys.path.insert(0, str(TESTS / "api"))
from kt_auth import make_ca  # noqa: E402  # the test CA helper (cryptography)
from test_spec_fields import BAD_VALUES  # noqa: E402

BASE_SPEC: dict[str, Any] = {
    "model": {"name": "meta-llama/Llama-3.1-8B-Instruct"},
    "dataset": {"source": "s3://datasets/support/train.jsonl", "format": "chat"},
    "output": {"uri": "s3://adapters/support-bot/", "credentialsSecret": "s3-credentials"},
}
SPEC_ROWS = [(p, v, m) for p, v, m in BAD_VALUES if p.startswith("spec.")]


def with_value(spec: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    node = spec = copy.deepcopy(spec)
    keys = dotted.removeprefix("spec.").split(".")
    if keys == ["spec"]:
        return value  # type: ignore[no-any-return]
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value
    return spec


def admission_review(spec: Any, operation: str = "CREATE") -> dict[str, Any]:
    obj = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
           "metadata": {"name": "support-bot", "namespace": "team-a", "uid": str(uuid.uuid4())}, "spec": spec}
    gvk = {"group": "kubetune.io", "version": "v1alpha1", "kind": "FineTuneJob"}
    gvr = {"group": "kubetune.io", "version": "v1alpha1", "resource": "finetunejobs"}
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": str(uuid.uuid4()), "kind": gvk, "resource": gvr, "requestKind": gvk, "requestResource": gvr,
        "name": "support-bot", "namespace": "team-a", "operation": operation,
        "userInfo": {"username": "alice", "groups": ["system:authenticated"]},
        "object": obj, "oldObject": None, "dryRun": False,
        "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}}}


@pytest.mark.parametrize(("path", "value", "message"), SPEC_ROWS, ids=[f"{p}={v!r}" for p, v, _ in SPEC_ROWS])
def test_review_refuses_every_bad_spec_value_with_the_cli_message(path: str, value: Any, message: str) -> None:
    problems = review(with_value(BASE_SPEC, path, value), load_catalog())
    assert any(message in line for line in problems), problems


def test_review_admits_good_specs_and_refuses_a_pinned_class_too_small() -> None:
    catalog = load_catalog()
    assert review(BASE_SPEC, catalog) == []
    assert review({**BASE_SPEC, "model": {"source": "s3://models/unknown-arch/"}}, catalog) == []  # operator's
    small = {**BASE_SPEC, "model": {"name": "meta-llama/Llama-3.1-70B-Instruct"},
             "resources": {"gpuClass": "L4", "gpuCount": 1}}
    [line] = review(small, catalog)
    assert line.startswith("spec.resources.gpuClass: L4") and "cannot hold this job" in line


@pytest.fixture
async def webhook(cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    ca = make_ca(tmp_path / "webhook", hosts=("127.0.0.1", "kubetune-webhook.kubetune-system.svc"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("KUBETUNE_WEBHOOK_PORT", str(port))
    monkeypatch.setenv("KUBETUNE_WEBHOOK_ADDR", "127.0.0.1")
    monkeypatch.setenv("KUBETUNE_WEBHOOK_CERT_DIR", str(tmp_path / "webhook"))
    operator = RunningOperator(cluster.url, Settings())
    cluster.operators.append(operator)
    await operator.start()
    context = ssl.create_default_context(cafile=str(ca.ca_file))
    async with httpx.AsyncClient(base_url=f"https://127.0.0.1:{port}", verify=context, timeout=20) as client:
        for _ in range(100):
            try:
                await client.post(f"/{WEBHOOK_ID}", json=admission_review(BASE_SPEC))
                break
            except httpx.ConnectError:
                await asyncio.sleep(0.1)
        yield client


async def verdict(client: httpx.AsyncClient, spec: Any) -> dict[str, Any]:
    sent = admission_review(spec)
    response = await client.post(f"/{WEBHOOK_ID}", json=sent)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["kind"] == "AdmissionReview" and body["response"]["uid"] == sent["request"]["uid"]
    return dict(body["response"])


async def test_the_webhook_endpoint_refuses_every_row_and_admits_a_good_job(webhook: httpx.AsyncClient) -> None:
    assert (await verdict(webhook, BASE_SPEC))["allowed"] is True
    for path, value, message in SPEC_ROWS:
        answer = await verdict(webhook, with_value(BASE_SPEC, path, value))
        assert answer["allowed"] is False, (path, value)
        assert answer["status"]["code"] == 422
        assert message in answer["status"]["message"], (path, answer["status"]["message"])
    too_small = {**BASE_SPEC, "model": {"name": "meta-llama/Llama-3.1-70B-Instruct"},
                 "resources": {"gpuClass": "L4", "gpuCount": 1}}
    answer = await verdict(webhook, too_small)
    assert answer["allowed"] is False and "cannot hold this job" in answer["status"]["message"]


def test_webhook_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBETUNE_WEBHOOK_PORT", raising=False)
    assert WebhookSettings.from_env() is None
    monkeypatch.setenv("KUBETUNE_WEBHOOK_PORT", "https")
    with pytest.raises(Exception, match="KUBETUNE_WEBHOOK_PORT: must be a port number"):
        WebhookSettings.from_env()
    monkeypatch.setenv("KUBETUNE_WEBHOOK_PORT", "9443")
    settings = WebhookSettings.from_env()
    assert settings is not None and settings.port == 9443 and settings.cert_dir == Path("/var/run/kubetune/webhook")
