"""Issue 11 finding 10: the operator's RBAC is what it uses, no more, and it works with exactly that.

The chart's ClusterRole, as rendered, becomes the emulator's RBAC (kt_auth.AuthEmulator: 403 for anything
not granted); the real operator runs a job's whole life with a token bound to it. The test then compares
what was granted with what was used.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import kmock
import kopf
import pytest
from kt_cluster import NS, Cluster, RunningOperator, eventually, finetunejob
from kubetune_operator.main import build_operator
from kubetune_operator.settings import Settings

from kubetune.contracts import Outcome, TerminationSummary

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "api"))
from kt_auth import AuthEmulator, Rule, User  # noqa: E402

_spec = importlib.util.spec_from_file_location("kubetune_chart_render_rbac", ROOT / "charts" / "render.py")
assert _spec and _spec.loader
RENDER = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(RENDER)

OPERATOR = User("system:serviceaccount:kubetune-system:kubetune", ("system:serviceaccounts", "system:authenticated"))
# Granted but not reached by one job's happy life; each with the path that needs it.
NOT_EXERCISED = {
    ("get", "jobs.batch"): "a create that conflicts (operator restart): is the existing Job ours?",
    ("get", "configmaps"): "a create that conflicts (operator restart): is the existing ConfigMap ours?",
    ("patch", "jobs.batch"): "suspend and resume (spec.suspend)",
    ("create", "services"): "a multi-node attempt (its headless Service for the rendezvous)",
    ("get", "services"): "a multi-node attempt's create that conflicts (operator restart)",
    ("list", "jobsets.jobset.x-k8s.io"): "the trainer JobSets' index, where the cluster serves JobSet",
    ("watch", "jobsets.jobset.x-k8s.io"): "the trainer JobSets' index, where the cluster serves JobSet",
    ("create", "jobsets.jobset.x-k8s.io"): "a multi-node attempt where the cluster serves JobSet",
    ("get", "jobsets.jobset.x-k8s.io"): "a JobSet create that conflicts (operator restart)",
    ("patch", "jobsets.jobset.x-k8s.io"): "suspend and resume of a JobSet (spec.suspend)",
    ("get", "finetunejobs.kubetune.io"): "kopf re-reads an object after a conflicting patch",
    ("list", "customresourcedefinitions.apiextensions.k8s.io"): "kopf follows CRD changes",
    ("watch", "customresourcedefinitions.apiextensions.k8s.io"): "kopf follows CRD changes",
    ("list", "namespaces"): "kopf, when serving a set of namespaces",
    ("watch", "namespaces"): "kopf, when serving a set of namespaces",
}


def chart_rules(values: dict[str, Any] | None = None) -> list[Rule]:
    [role] = [o for o in RENDER.render(values or {}) if o["kind"] == "ClusterRole"]
    rules = []
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                name = f"{resource.replace('/', '/')}.{group}" if group else resource
                if "/" in resource and group:
                    plural, sub = resource.split("/")
                    name = f"{plural}/{sub}.{group}"
                for verb in rule["verbs"]:
                    rules.append(Rule(OPERATOR.username, verb, name))
    return rules


class TokenOperator(RunningOperator):
    """RunningOperator, logged in with a bearer token (the service account's), not anonymously."""

    def _main(self) -> None:
        url = self.url

        def login(**_: Any) -> kopf.ConnectionInfo:
            return kopf.ConnectionInfo(server=url, insecure=True, default_namespace=NS, token="operator-token")

        registry, memo = build_operator(self.settings, self.metrics, login=login)

        @kopf.on.startup(registry=registry)
        def fast(settings: kopf.OperatorSettings, **_: Any) -> None:
            settings.networking.error_backoffs = (0.05, 0.1, 0.2)
            settings.watching.reconnect_backoff = 0.1
            settings.queueing.exit_timeout = 2

        try:
            asyncio.run(kopf.operator(registry=registry, memo=memo, clusterwide=True, standalone=True,
                                      identity=cast(Any, f"rbac-operator-{id(self)}"),
                                      stop_flag=self.stop_flag, ready_flag=self.ready))
        except BaseException as exc:
            self.error = exc


@pytest.fixture
async def rbac_cluster() -> AsyncIterator[tuple[Cluster, AuthEmulator]]:
    admin = User("admin", ("system:masters",))
    async with AuthEmulator(tokens={"operator-token": OPERATOR, "admin-token": admin},
                            rules=[*chart_rules(), Rule("system:masters", "*", "*")]) as api, \
            kmock.Server(api) as server:
        world = Cluster(api, str(server.url).rstrip("/"))
        await world.add_namespaces("default", NS, "kubetune-system")
        await world.add_nodes()
        try:
            yield world, api
        finally:
            for operator in world.operators:
                await operator.stop()


async def test_the_operator_runs_a_job_with_exactly_the_charts_rbac(rbac_cluster: tuple[Cluster, AuthEmulator],
                                                                     trainer_standin: tuple[int, dict]) -> None:
    cluster, api = rbac_cluster
    port, _ = trainer_standin
    operator = TokenOperator(cluster.url, Settings(poll_interval=0.3, metrics_port=0))
    cluster.operators.append(operator)
    await operator.start()
    legacy = finetunejob("run")  # with the finalizer an operator that ran a timer per job set: kopf removes it
    legacy["metadata"]["finalizers"] = ["kubetune.io/finalizer"]
    await api.put_object("finetunejobs", legacy)
    await cluster.wait_phase("run", "Queued")
    await eventually(lambda: not (api.read("finetunejobs", NS, "run") or {})["metadata"].get("finalizers"),
                     what="kopf removing the finalizer no handler needs")
    [job] = cluster.jobs()
    pod = await cluster.run_pod(job, "gpu-l4-1", port=port)
    await eventually(lambda: cluster.status("run").get("step") == "120/500")
    summary = TerminationSummary(outcome=Outcome.SUCCEEDED, exit_code=0, steps=500,
                                 adapter_uri="s3://adapters/run/adapter/")
    await cluster.end_pod(pod, 0, summary.message())
    await cluster.wait_phase("run", "Succeeded")
    await eventually(lambda: "Succeeded" in [e["reason"] for e in cluster.events("run")], what="the Event")
    await api.remove_object("finetunejobs", NS, "run")
    await eventually(lambda: api.read("finetunejobs", NS, "run") is None, what="the deletion")

    assert [d for d in api.denied if d[0] == OPERATOR.username] == []
    used = {(verb, resource) for user, verb, resource in api.used if user == OPERATOR.username}
    granted = {(r.verb, r.resource) for r in chart_rules()}
    unused = granted - used - set(NOT_EXERCISED)
    assert unused == set(), f"granted but never used: {sorted(unused)}"
    writes = [r for r in api if "finetunejobs" in str(r.url) and str(r.method.value).upper() == "PATCH"
              and not str(r.url.path).endswith("/status")]
    assert writes, "kopf did not remove the old finalizer?"
    for request in writes:  # patch on the main resource: kopf's finalizer removal only, never spec or annotations
        if isinstance(request.data, list):  # a JSON patch
            assert all(str(op.get("path", "")).startswith(("/metadata/finalizers", "/metadata/resourceVersion"))
                       for op in request.data), request.data
        else:
            assert set(request.data) <= {"metadata"}, request.data
            assert set(request.data.get("metadata", {})) <= {"finalizers", "resourceVersion"}, request.data


def test_status_is_patched_never_updated_and_secrets_are_not_granted() -> None:
    granted = {(r.verb, r.resource) for r in chart_rules({"ha": {"enabled": True}})}
    assert {v for v, res in granted if res == "finetunejobs/status.kubetune.io"} == {"patch"}
    assert not {res for _, res in granted if res.startswith("secrets")}
    assert not {v for v, _ in granted} & {"update", "delete", "deletecollection", "escalate", "bind", "impersonate"}
    helpers = (ROOT / "charts" / "kubetune" / "templates" / "_helpers.tpl").read_text()
    for resource in ("finetunejobs:", "finetunejobs/status:", "jobs:", "jobsets:", "configmaps:", "services:",
                     "pods:", "events:"):
        assert f"# {resource}" in helpers, f"the reason for the {resource} verbs is not documented"


