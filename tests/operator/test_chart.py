"""The Helm chart, rendered through helm-python-sdk (Helm's Go SDK); every object schema-validated."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = "1.31.0"
TRAINER_METRICS = ["kubetune_train_loss", "kubetune_eval_loss", "kubetune_tokens_per_second",
                   "kubetune_gpu_memory_allocated_bytes", "kubetune_gpu_memory_peak_bytes",
                   "kubetune_vram_estimate_bytes",
                   "kubetune_train_step", "kubetune_train_total_steps", "kubetune_operator_jobs"]
ALL_ON = {
    "operator": {"watchNamespaces": ["ml", "research"]},
    "ha": {"enabled": True},
    "s3": {"endpoint": "http://minio.storage:9000"},
    "gpuCatalog": {"classes": [{"name": "L40S", "memoryGiB": 44.5, "hourlyPrice": 1.86,
                                "nodeLabels": [{"nvidia.com/gpu.product": "NVIDIA-L40S"}]}]},
    "monitoring": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}},
}


def _load_render() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kubetune_chart_render", ROOT / "charts" / "render.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RENDER = _load_render()


def validate(obj: dict[str, Any]) -> None:
    if obj["apiVersion"].startswith(("monitoring.coreos.com/", "kopf.dev/")):
        assert obj["metadata"]["name"] and obj["spec" if "spec" in obj else "metadata"]  # CRDs of other projects
        return
    kubernetes_validate.validate(obj, K8S, strict=True)


@pytest.fixture(scope="module")
def default_objects() -> list[dict[str, Any]]:
    return RENDER.render()


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def test_default_render_is_valid_and_complete(default_objects: list[dict[str, Any]]) -> None:
    for obj in default_objects:
        validate(obj)
    kinds = sorted(o["kind"] for o in default_objects)
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "ConfigMap", "Deployment", "Service", "ServiceAccount"]


def test_everything_switched_on_is_valid(default_objects: list[dict[str, Any]]) -> None:
    objects = RENDER.render(ALL_ON)
    for obj in objects:
        validate(obj)
    kinds = {o["kind"] for o in objects}
    assert {"Role", "RoleBinding", "ServiceMonitor", "PodMonitor", "KopfPeering"} <= kinds
    [deployment] = by_kind(objects, "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert "--namespace=ml" in container["args"] and "--peering=kubetune" in container["args"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["KUBETUNE_S3_ENDPOINT"] == "http://minio.storage:9000"
    assert env["KUBETUNE_GPU_CATALOG"] == "/etc/kubetune/gpus.yaml"
    assert deployment["spec"]["replicas"] == 2
    catalog = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("gpu-catalog"))
    assert yaml.safe_load(catalog["data"]["gpus.yaml"])["classes"][0]["name"] == "L40S"
    [pod_monitor] = by_kind(objects, "PodMonitor")
    assert pod_monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] == "kubetune-trainer"
    assert pod_monitor["spec"]["namespaceSelector"] == {"matchNames": ["ml", "research"]}
    roles = by_kind(objects, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["ml", "research"]
    [cluster_role] = by_kind(objects, "ClusterRole")
    assert all("jobs" not in rule["resources"] for rule in cluster_role["rules"])  # namespaced mode: Roles only


def test_rbac_is_least_privilege(default_objects: list[dict[str, Any]]) -> None:
    [role] = by_kind(default_objects, "ClusterRole")
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
        assert "secrets" not in rule["resources"]
        assert not {"delete", "deletecollection", "escalate", "bind", "impersonate"} & set(rule["verbs"])
    granted = {(group, resource): set(rule["verbs"])
               for rule in role["rules"] for group in rule["apiGroups"] for resource in rule["resources"]}
    assert granted[("", "nodes")] == {"list", "watch"}
    assert granted[("batch", "jobs")] == {"get", "list", "watch", "create", "patch"}
    assert granted[("kubetune.io", "finetunejobs/status")] >= {"patch"}


def test_operator_deployment_is_hardened(default_objects: list[dict[str, Any]]) -> None:
    [deployment] = by_kind(default_objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "privileged": False, "capabilities": {"drop": ["ALL"]}}
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["image"] == "ghcr.io/kubetune/operator:0.1.0"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["KUBETUNE_TRAINER_IMAGE"] == "ghcr.io/kubetune/trainer:0.1.0"
    assert container["args"][0] == "operator"


def test_grafana_dashboard_configmap(default_objects: list[dict[str, Any]]) -> None:
    [dashboard] = [o for o in by_kind(default_objects, "ConfigMap") if o["metadata"]["name"].endswith("dashboard")]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    board = json.loads(dashboard["data"]["kubetune.json"])
    exprs = " ".join(t["expr"] for p in board["panels"] for t in p["targets"])
    for metric in TRAINER_METRICS:
        assert metric in exprs, metric
    titles = [p["title"] for p in board["panels"]]
    assert "GPU memory vs the planner's estimate" in titles and "FineTuneJobs by phase" in titles


def test_chart_lints_clean() -> None:
    report = helm_python.lint(str(ROOT / "charts" / "kubetune"))
    errors = [m for m in report["messages"] if m["severity"] >= 3] + list(report.get("errors") or [])
    assert errors == [], errors


def test_crds_folder_holds_exactly_what_kubetune_crd_prints() -> None:
    files = sorted((ROOT / "charts" / "kubetune" / "crds").iterdir())
    assert [f.name for f in files] == ["finetunejobs.kubetune.io.yaml"]
    assert files[0].read_text() == RENDER.crd_text(), "run: python charts/render.py"


def test_install_yaml_is_the_default_render() -> None:
    text = (ROOT / "manifests" / "install.yaml").read_text()
    assert text == RENDER.install_text(), "manifests/install.yaml drifted: run python charts/render.py"
    docs = [d for d in yaml.safe_load_all(text) if d]
    assert [d["kind"] for d in docs[:2]] == ["Namespace", "CustomResourceDefinition"]
    for doc in docs:
        validate(doc)


def test_operator_dockerfile_is_slim_and_non_root() -> None:
    text = (ROOT / "Dockerfile.operator").read_text()
    base = next(line.split("=", 1)[1] for line in text.splitlines() if line.startswith("ARG PYTHON_IMAGE="))
    stages = [line.split()[1].replace("${PYTHON_IMAGE}", base).split("@")[0]
              for line in text.splitlines() if line.startswith("FROM ")]
    assert stages and all(image.endswith("-slim") for image in stages)
    user = next(line.split()[1] for line in text.splitlines() if line.startswith("USER "))
    assert user.split(":")[0].isdigit() and user.split(":")[0] != "0"  # numeric, so runAsNonRoot can check it
    assert "-r requirements/operator.lock" in text and "[trainer]" not in text and "[all]" not in text  # no torch
    assert "torch" not in (ROOT / "requirements" / "operator.lock").read_text()
    for line in text.splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source
    deployment = next(o for o in RENDER.render() if o["kind"] == "Deployment")
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(user.split(":")[0])


def test_api_is_off_by_default_and_hardened_when_on(default_objects: list[dict[str, Any]]) -> None:
    assert not [o for o in default_objects if o["metadata"]["name"].endswith("-api")]
    objects = RENDER.render({"api": {"enabled": True}})
    for obj in objects:
        validate(obj)
    api = [o for o in objects if o["metadata"]["name"].endswith("-api")]
    assert sorted(o["kind"] for o in api) == ["Deployment", "Service", "ServiceAccount"]  # passthrough: no RBAC
    [deployment] = [o for o in api if o["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    [container] = pod["containers"]
    assert container["args"] == ["api", "--port=8000"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_api_in_serviceaccount_mode_gets_only_the_rights_its_routes_need() -> None:
    objects = RENDER.render({"api": {"enabled": True, "auth": "serviceaccount"}})
    for obj in objects:
        validate(obj)
    [role] = [o for o in objects if o["kind"] == "ClusterRole" and o["metadata"]["name"].endswith("-api")]
    assert role["rules"] == [{"apiGroups": ["kubetune.io"], "resources": ["finetunejobs"],
                              "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
                             {"apiGroups": [""], "resources": ["events"], "verbs": ["list", "watch"]},
                             {"apiGroups": [""], "resources": ["nodes", "pods", "namespaces"], "verbs": ["list"]},
                             {"apiGroups": ["kueue.x-k8s.io"], "resources": ["localqueues", "clusterqueues"],
                              "verbs": ["get", "list"]},
                             {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"],
                              "verbs": ["create"]},
                             {"apiGroups": ["authorization.k8s.io"], "resources": ["subjectaccessreviews"],
                              "verbs": ["create"]}]
    [deployment] = [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-api")]
    assert deployment["spec"]["template"]["spec"]["automountServiceAccountToken"] is False  # projected instead
