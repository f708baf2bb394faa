"""Issue 11 finding 10: pods with a read-only root, size-limited scratch, one uid; the webhook and the
trainer NetworkPolicy as the chart renders them (schema-validated like every chart object)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from kubetune_operator import resources
from kubetune_operator.settings import Settings
from kubetune_operator.shape import shape_of
from kubetune_operator.webhook import WEBHOOK_ID

from kubetune.planning.gpus import load_catalog
from kubetune.planning.plan import make_plan
from kubetune.sources import model_architecture
from kubetune.spec import parse_spec

ROOT = Path(__file__).resolve().parents[2]
K8S = "1.31.0"
_spec = importlib.util.spec_from_file_location("kubetune_chart_render_hardening", ROOT / "charts" / "render.py")
assert _spec and _spec.loader
RENDER = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(RENDER)
OTHER_PROJECTS = ("monitoring.coreos.com/", "kopf.dev/", "cert-manager.io/")


def trainer_job(settings: Settings | None = None) -> dict[str, Any]:
    spec = parse_spec({"model": {"name": "meta-llama/Llama-3.1-8B-Instruct"},
                       "dataset": {"source": "s3://datasets/train.jsonl"}, "output": {"uri": "s3://out/x/"}})
    catalog = load_catalog()
    plan = make_plan(spec, model_architecture(spec.model.name, spec.model.source), catalog)
    owner = resources.Owner("support-bot", "ml", "0b8f6f3e-1111-2222-3333-444455556666", {})
    gpu = catalog.get(plan.gpu_class, "x")
    return resources.trainer_job(owner, spec, plan, gpu, 1, settings or Settings(),
                                 shape_of(plan.strategy, plan.gpu_count, gpu))


def pod_volumes_are_size_limited(pod: dict[str, Any]) -> None:
    for volume in pod.get("volumes", []):
        if "emptyDir" in volume:
            assert volume["emptyDir"].get("sizeLimit"), f"emptyDir {volume['name']} has no sizeLimit"


def test_trainer_pod_has_a_read_only_root_and_size_limited_writable_dirs() -> None:
    job = trainer_job(Settings(scratch_size="7Gi"))
    kubernetes_validate.validate(job, K8S, strict=True)
    pod = job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    pod_volumes_are_size_limited(pod)
    volumes = {v["name"]: v for v in pod["volumes"]}
    writable = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"] if not m.get("readOnly")}
    assert writable["/tmp"]["emptyDir"] == {"sizeLimit": "7Gi"}
    assert "/dev/shm" in writable


def test_one_uid_across_image_docs_and_pod() -> None:
    dockerfile = (ROOT / "Dockerfile.trainer").read_text()
    users = re.findall(r"^USER (\d+):(\d+)", dockerfile, re.M)
    assert users == [("10001", "10001")]
    assert "--uid 10001" in dockerfile and "--gid 10001" in dockerfile
    assert "uid 10001" in (ROOT / "docs" / "trainer.md").read_text()
    assert not re.search(r"\buid 1000\b", (ROOT / "docs" / "trainer.md").read_text())
    context = trainer_job()["spec"]["template"]["spec"]["securityContext"]
    assert context["runAsUser"] == context["runAsGroup"] == context["fsGroup"] == 10001
    for obj in RENDER.render({"api": {"enabled": True}}):
        if obj["kind"] == "Deployment":
            assert obj["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 10001


def test_every_chart_pod_limits_its_writable_dirs() -> None:
    for obj in RENDER.render({"api": {"enabled": True}, "webhook": {"enabled": True}}):
        if obj["kind"] == "Deployment":
            pod = obj["spec"]["template"]["spec"]
            pod_volumes_are_size_limited(pod)
            for container in pod["containers"]:
                assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_webhook_chart_wires_the_operator_to_the_apiserver() -> None:
    objects = RENDER.render({"webhook": {"enabled": True}})
    for obj in objects:
        if not obj["apiVersion"].startswith(OTHER_PROJECTS):
            kubernetes_validate.validate(obj, K8S, strict=True)
    [config] = [o for o in objects if o["kind"] == "ValidatingWebhookConfiguration"]
    [hook] = config["webhooks"]
    assert hook["clientConfig"]["service"]["path"] == f"/{WEBHOOK_ID}"
    assert hook["rules"] == [{"apiGroups": ["kubetune.io"], "apiVersions": ["v1alpha1"], "resources": ["finetunejobs"],
                              "operations": ["CREATE", "UPDATE"], "scope": "Namespaced"}]
    [certificate] = [o for o in objects if o["kind"] == "Certificate"]
    assert config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == \
        f"{certificate['metadata']['namespace']}/{certificate['metadata']['name']}"
    service = hook["clientConfig"]["service"]
    assert f"{service['name']}.{service['namespace']}.svc" in certificate["spec"]["dnsNames"]
    [deployment] = [o for o in objects if o["kind"] == "Deployment"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["KUBETUNE_WEBHOOK_PORT"] == "9443"
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == env["KUBETUNE_WEBHOOK_CERT_DIR"])
    assert volumes[mount["name"]]["secret"]["secretName"] == certificate["spec"]["secretName"]
    assert not [o for o in RENDER.render() if o["kind"] == "ValidatingWebhookConfiguration"]  # off by default


def test_trainer_network_policy_admits_only_the_operator_and_prometheus_on_the_trainer_port() -> None:
    assert not [o for o in RENDER.render() if o["kind"] == "NetworkPolicy"]
    objects = RENDER.render({"networkPolicy": {"trainer": {"enabled": True}},
                             "operator": {"watchNamespaces": ["ml", "research"]}})
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    assert sorted(p["metadata"]["namespace"] for p in policies) == ["ml", "research"]
    job_labels = trainer_job()["spec"]["template"]["metadata"]["labels"]
    [deployment] = [o for o in objects if o["kind"] == "Deployment"]
    operator_labels = deployment["spec"]["template"]["metadata"]["labels"]
    for policy in policies:
        kubernetes_validate.validate(policy, K8S, strict=True)
        spec = policy["spec"]
        assert spec["policyTypes"] == ["Ingress"]
        assert all(job_labels.get(k) == v for k, v in spec["podSelector"]["matchLabels"].items())
        port_rule, peers_rule = spec["ingress"]
        assert port_rule["ports"] == [{"port": 8000, "protocol": "TCP"}]
        operator_peer, prometheus_peer = port_rule["from"]
        assert all(operator_labels.get(k) == v for k, v in operator_peer["podSelector"]["matchLabels"].items())
        assert operator_peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "kubetune-system"}
        assert prometheus_peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}
        assert peers_rule == {"from": [{"podSelector": spec["podSelector"]}]}  # ranks of a job, same namespace


def test_network_policy_needs_namespaces_when_watching_the_whole_cluster() -> None:
    with pytest.raises(Exception, match=r"networkPolicy\.trainer\.namespaces"):
        RENDER.render({"networkPolicy": {"trainer": {"enabled": True}}})
