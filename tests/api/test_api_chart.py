"""Issue 11 finding 2: the chart's API pod can reach the API server over verified TLS, in both modes.

The rendered pod must hand the API exactly what ApiSettings.from_env reads: the cluster CA from the
kube-root-ca.crt ConfigMap (every namespace has it), and in serviceaccount mode a projected, expiring
token; never an automounted one. test_api_auth.py runs both modes over HTTPS with these settings.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from kubetune.api import ApiSettings

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("kubetune_chart_render_api", ROOT / "charts" / "render.py")
assert spec and spec.loader
RENDER = importlib.util.module_from_spec(spec)
spec.loader.exec_module(RENDER)


def api_pod(auth: str) -> dict[str, Any]:
    objects = RENDER.render({"api": {"enabled": True, "auth": auth}})
    [deployment] = [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-api")]
    return dict(deployment["spec"]["template"]["spec"])


@pytest.mark.parametrize("auth", ["passthrough", "serviceaccount"])
def test_api_pod_gets_the_cluster_ca_and_only_the_token_its_mode_needs(auth: str, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    pod = api_pod(auth)
    assert pod["automountServiceAccountToken"] is False
    [container] = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    kube = mounts["/var/run/secrets/kubetune/kube"]
    assert kube["readOnly"] is True
    sources = volumes[kube["name"]]["projected"]["sources"]
    assert {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}} in sources
    tokens = [s["serviceAccountToken"] for s in sources if "serviceAccountToken" in s]
    assert env["KUBETUNE_KUBE_CA"] == "/var/run/secrets/kubetune/kube/ca.crt"
    if auth == "serviceaccount":
        assert tokens == [{"path": "token", "expirationSeconds": 3607}]
        assert env["KUBETUNE_KUBE_TOKEN_FILE"] == "/var/run/secrets/kubetune/kube/token"
    else:
        assert tokens == [] and "KUBETUNE_KUBE_TOKEN_FILE" not in env
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert volumes[mounts["/tmp"]["name"]]["emptyDir"]["sizeLimit"]

    for name, value in env.items():  # what the API process reads from that environment
        monkeypatch.setenv(name, value)
    settings = ApiSettings.from_env()
    assert settings.auth == auth and settings.kube_url == "https://kubernetes.default.svc"
    assert settings.ca_file == env["KUBETUNE_KUBE_CA"]
    assert settings.token_file == env.get("KUBETUNE_KUBE_TOKEN_FILE")


def test_bad_api_settings_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from kubetune.errors import KubetuneError

    monkeypatch.setenv("KUBETUNE_API_AUTH", "none")
    with pytest.raises(KubetuneError, match="KUBETUNE_API_AUTH: must be one of: passthrough, serviceaccount"):
        ApiSettings.from_env()
    monkeypatch.setenv("KUBETUNE_API_AUTH", "passthrough")
    monkeypatch.setenv("KUBETUNE_API_PLAN_TIMEOUT", "soon")
    with pytest.raises(KubetuneError, match="KUBETUNE_API_PLAN_TIMEOUT: must be a number"):
        ApiSettings.from_env()


def test_quotas_from_the_values_reach_the_operator_and_the_api_as_one_file(monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml

    from kubetune.quota import Limits, parse_quotas

    values = {"default": {"maxConcurrentJobs": 4},
              "namespaces": {"team-a": {"maxGpus": 2, "allowedGpuClasses": ["L4"], "maxEstimatedCost": 20}}}
    objects = RENDER.render({"api": {"enabled": True, "auth": "serviceaccount", "namespaces": ["team-a", "team-b"],
                                     "prometheusUrl": "http://prometheus-operated.monitoring:9090"},
                             "quotas": values})
    [config] = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-quotas")]
    quotas = parse_quotas(yaml.safe_load(config["data"]["quotas.yaml"]))
    assert quotas.for_namespace("team-a") == Limits(max_concurrent_jobs=4, max_gpus=2, allowed_gpu_classes=("L4",),
                                                    max_estimated_cost=20.0)
    deployments = [o for o in objects if o["kind"] == "Deployment"]
    assert len(deployments) == 2  # the operator and the API
    for deployment in deployments:
        pod = deployment["spec"]["template"]["spec"]
        [container] = pod["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        mount = next(m for m in container["volumeMounts"] if m["name"] == "quotas")
        assert env["KUBETUNE_QUOTAS"] == f"{mount['mountPath']}/quotas.yaml"
        volume = next(v for v in pod["volumes"] if v["name"] == "quotas")
        assert volume["configMap"]["name"] == config["metadata"]["name"]
    [api] = [d for d in deployments if d["metadata"]["name"].endswith("-api")]
    api_env = {e["name"]: e.get("value") for e in api["spec"]["template"]["spec"]["containers"][0]["env"]}
    for name, value in api_env.items():
        monkeypatch.setenv(name, value)
    settings = ApiSettings.from_env()
    assert settings.namespaces == ("team-a", "team-b") and settings.quotas_file == api_env["KUBETUNE_QUOTAS"]
    assert settings.sse_heartbeat == 15 and settings.sse_replay == 1000
    assert settings.prometheus_url == "http://prometheus-operated.monitoring:9090"
    [role] = [o for o in objects if o["kind"] == "ClusterRole" and o["metadata"]["name"].endswith("-api")]
    rules = {(g, r): set(rule["verbs"]) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert {"watch", "list"} <= rules[("kubetune.io", "finetunejobs")] and rules[("", "events")] == {"list", "watch"}
    assert rules[("", "nodes")] == rules[("", "namespaces")] == {"list"}
    assert not any("secrets" in r for _, r in rules)
