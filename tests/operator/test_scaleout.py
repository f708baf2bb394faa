"""The shapes a plan runs in: one pod with torchrun over one node's GPUs, or over several nodes a headless Service
plus an Indexed Job, or a JobSet where the cluster serves that API; every object validated against the Kubernetes
schemas, the JobSet against the JobSet CRD's (vendored, tests/operator/data/README.md)."""

from __future__ import annotations

import dataclasses
import gzip
import re
import sys
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubetune_operator import resources, scaleout
from kubetune_operator.settings import Settings
from kubetune_operator.shape import Shape, shape_of

from kubetune.planning.gpus import load_catalog
from kubetune.planning.models import resolve_architecture
from kubetune.planning.placement import Inventory, NodeInfo, place
from kubetune.planning.plan import make_plan
from kubetune.planning.ranks import plan_strategy
from kubetune.spec import parse_spec

sys.path.insert(0, str(Path(__file__).parents[1] / "core"))
from kt_admission import admit  # kube-apiserver's checks of a custom resource, CEL included

CATALOG = load_catalog()
JOBSET_CRD = Path(__file__).parent / "data" / "jobset.x-k8s.io_jobsets-v0.12.0.yaml.gz"
RFC1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")  # Service names (validation.IsDNS1035Label)
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")  # pod hostnames and subdomains
K8S = "1.31.0"
OWNER = resources.Owner("support-bot", "ml", "0b8f6f3e-1111-2222-3333-444455556666", {})
A10G = CATALOG.get("A10G", "x")
A10G_4 = dataclasses.replace(A10G, max_per_node=4)  # g5.12xlarge: 4 A10G per node


def job_spec(**resources_: Any) -> Any:
    return parse_spec({"model": {"name": "meta-llama/Llama-3.1-8B-Instruct"},
                       "dataset": {"source": "s3://datasets/train.jsonl"},
                       "output": {"uri": "s3://adapters/x/", "credentialsSecret": "s3-creds"},
                       "queue": "team-a", "resources": resources_})


def plan_on(spec: Any, gpu_class: str, count: int) -> Any:
    plan = make_plan(spec, resolve_architecture(spec.model.name, spec.model.source), CATALOG)
    return plan.model_copy(update={"gpu_class": gpu_class, "gpu_count": count,
                                   "strategy": plan_strategy(spec.resources.strategy, count)})


def children_of(owner: resources.Owner, spec: Any, plan: Any, gpu: Any, attempt: int, settings: Settings,
                jobset_api: str | None = None) -> list[dict[str, Any]]:
    """As reconcile._launch does it: the shape decided once from the plan, then passed down."""
    shape = shape_of(scaleout.strategy_of(spec, plan), plan.gpu_count, gpu)
    return scaleout.trainer_children(owner, spec, plan, gpu, shape, attempt, settings, jobset_api)


def container(job: dict[str, Any]) -> dict[str, Any]:
    return dict(job["spec"]["template"]["spec"]["containers"][0])


@pytest.mark.parametrize(("strategy", "count", "gpu", "expected"), [
    ("single", 1, A10G, Shape("single", 1, 1)),
    ("pipeline", 4, A10G, Shape("pipeline", 1, 4)),
    ("ddp", 4, A10G, Shape("ddp", 1, 4)),
    ("fsdp", 8, A10G, Shape("fsdp", 1, 8)),
    ("fsdp", 8, A10G_4, Shape("fsdp", 2, 4)),
    ("ddp", 6, A10G_4, Shape("ddp", 2, 3)),      # as few nodes as hold them, the same count on each
    ("fsdp", 16, A10G_4, Shape("fsdp", 4, 4)),
])
def test_shape_of(strategy: Any, count: int, gpu: Any, expected: Shape) -> None:
    assert shape_of(strategy, count, gpu) == expected


@pytest.mark.parametrize(("strategy", "count", "message"), [
    ("pipeline", 8, "only ddp and fsdp span nodes"),
    ("fsdp", 5, "do not split evenly over 2 nodes"),
    ("ddp", 0, "gpu_count must be >= 1"),
])
def test_shapes_that_cannot_run_are_refused(strategy: Any, count: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        shape_of(strategy, count, A10G_4)


@pytest.mark.parametrize(("spec_strategy", "count", "expected"), [
    ("auto", 1, "single"), ("auto", 2, "pipeline"), ("ddp", 2, "ddp"), ("fsdp", 4, "fsdp"), ("fsdp", 1, "single"),
])
def test_strategy_from_the_spec_and_the_count(spec_strategy: str, count: int, expected: str) -> None:
    spec = job_spec(strategy=spec_strategy)
    assert scaleout.strategy_of(spec, plan_on(spec, "A10G", count)) == expected


def test_one_node_ddp_is_one_pod_running_torchrun() -> None:
    spec = job_spec(strategy="ddp")
    children = children_of(OWNER, spec, plan_on(spec, "A10G", 4), A10G, 1, Settings())
    assert [c["kind"] for c in children] == ["Job"]
    job = children[0]
    kubernetes_validate.validate(job, K8S, strict=True)
    command = container(job)["command"]
    assert command[:3] == ["python", "-m", "kubetune_trainer.launch"]
    assert command[command.index("--nproc-per-node") + 1] == "4" and "--standalone" in command
    assert command[-4:] == ["-m", "kubetune_trainer", "--config", "/etc/kubetune/job.json"]
    assert container(job)["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert "completionMode" not in job["spec"]


def test_layer_split_keeps_the_plain_trainer_command() -> None:
    spec = job_spec()
    job, = children_of(OWNER, spec, plan_on(spec, "A10G", 2), A10G, 1, Settings())
    assert container(job)["command"][:3] == ["python", "-m", "kubetune_trainer"]


def test_multi_node_is_an_indexed_job_with_a_headless_service_for_rendezvous() -> None:
    spec = job_spec(strategy="fsdp")
    service, job = children_of(OWNER, spec, plan_on(spec, "A10G", 8), A10G_4, 3, Settings())
    for obj in (service, job):
        kubernetes_validate.validate(obj, K8S, strict=True)
        assert obj["metadata"]["ownerReferences"] == [OWNER.reference()]
    name = "support-bot-a3"
    assert service["metadata"]["name"] == job["metadata"]["name"] == name
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    assert all(pod_labels[k] == v for k, v in service["spec"]["selector"].items())
    assert "kueue.x-k8s.io/queue-name" not in service["metadata"]["labels"]  # Kueue admits the Job, not this

    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    assert job["spec"]["backoffLimit"] == 0 and job["spec"]["suspend"] is True  # queued: Kueue admits all pods
    assert job["spec"]["template"]["spec"]["subdomain"] == name
    c = container(job)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "4"  # per pod: one node's GPUs
    command = c["command"]
    flags = dict(zip(command[3:-4:2], command[4:-4:2], strict=False))
    assert flags["--nnodes"] == "2" and flags["--nproc-per-node"] == "4" and flags["--rdzv-backend"] == "c10d"
    assert flags["--rdzv-endpoint"] == f"{name}-0.{name}.ml.svc:29400" and flags["--rdzv-id"] == name
    # each pod's own DNS name: torchrun ranks nodes by it, so the pod of index 0 is node rank 0
    assert flags["--local-addr"] == f"{name}-$(JOB_COMPLETION_INDEX).{name}.ml.svc"
    assert {"name": "rendezvous", "containerPort": 29400, "protocol": "TCP"} in c["ports"]
    assert job["metadata"]["annotations"]["kubetune.io/shape"] == "fsdp 2x4"


def test_the_launcher_accepts_the_command_the_operator_writes() -> None:
    """The flags are torchrun's own: its parser reads them as the pod will."""
    from torch.distributed.run import parse_args

    spec = job_spec(strategy="fsdp")
    _, job = children_of(OWNER, spec, plan_on(spec, "A10G", 8), A10G_4, 1, Settings())
    args = parse_args(container(job)["command"][3:])
    assert (args.nnodes, args.nproc_per_node, args.rdzv_backend, args.max_restarts) == ("2", "4", "c10d", 0)
    assert args.module and args.training_script == "kubetune_trainer"
    assert args.training_script_args == ["--config", "/etc/kubetune/job.json"]


def _node(name: str, gpus: int) -> NodeInfo:
    return NodeInfo(name=name, labels={"nvidia.com/gpu.product": "NVIDIA-A10G"}, allocatable_gpus=gpus)


def test_placement_counts_free_gpus_on_each_node() -> None:
    nodes = (_node("g5-a", 4), _node("g5-b", 4), _node("g5-c", 2))
    assert place("A10G", 4, Inventory(nodes=nodes), CATALOG, nodes=2).kind == "Placed"
    busy = place("A10G", 4, Inventory(nodes=nodes, gpus_in_use={"g5-a": 1}), CATALOG, nodes=2)
    assert busy.kind == "Busy"
    too_few = place("A10G", 4, Inventory(nodes=nodes), CATALOG, nodes=3)
    assert too_few.kind == "NoNodes" and "on each of 3 nodes" in too_few.message


def test_the_plans_strategy_decides_the_shape() -> None:
    spec = job_spec(strategy="fsdp", maxGpuClass="A10G")
    plan = make_plan(spec, resolve_architecture("meta-llama/Llama-3.1-70B", None), CATALOG)
    assert plan.strategy == "fsdp" and scaleout.strategy_of(spec, plan) == "fsdp" and plan.gpu_count >= 4
    two_per_node = dataclasses.replace(A10G, max_per_node=2)  # more GPUs than one node holds: several pods
    _, job = children_of(OWNER, spec, plan, two_per_node, 1, Settings())
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["parallelism"] == plan.gpu_count // 2


# --- JobSet ------------------------------------------------------------------------------------------------

@cache
def jobset_crd() -> dict[str, Any]:
    return dict(yaml.safe_load(gzip.decompress(JOBSET_CRD.read_bytes())))


@pytest.mark.parametrize(("discovery", "expected"), [
    (None, None),  # 404: the group is not served
    ({"kind": "APIGroup", "name": "jobset.x-k8s.io", "versions": [{"groupVersion": "jobset.x-k8s.io/v1alpha2",
                                                                    "version": "v1alpha2"}]}, scaleout.JOBSET_API),
    ({"kind": "APIGroup", "name": "jobset.x-k8s.io", "versions": [{"groupVersion": "jobset.x-k8s.io/v1alpha1",
                                                                    "version": "v1alpha1"}]}, None),
    ({"versions": "nonsense"}, None),
])
def test_jobset_is_used_when_discovery_says_the_cluster_serves_it(discovery: Any, expected: str | None) -> None:
    assert scaleout.jobset_api(discovery) == expected


def child_job_of(jobset: dict[str, Any], index: int) -> dict[str, Any]:
    """The Job the JobSet controller makes of replicatedJob 0 (constructJob in jobset_controller.go, v0.12.0):
    the template's labels and spec, the JobSet's labels and annotations added, the subdomain, the suspend flag."""
    name, namespace = jobset["metadata"]["name"], jobset["metadata"]["namespace"]
    rjob = jobset["spec"]["replicatedJobs"][0]
    extra = {"jobset.sigs.k8s.io/jobset-name": name, "jobset.sigs.k8s.io/replicatedjob-name": rjob["name"],
             "jobset.sigs.k8s.io/job-index": str(index)}
    spec = yaml.safe_load(yaml.safe_dump(rjob["template"]["spec"]))  # a deep copy
    spec["template"]["metadata"]["labels"].update(extra)
    spec["template"]["metadata"]["annotations"].update(extra)
    spec["template"]["spec"]["subdomain"] = jobset["spec"]["network"]["subdomain"]
    spec["suspend"] = jobset["spec"]["suspend"]
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": f"{name}-{rjob['name']}-{index}", "namespace": namespace,
                         "labels": {**rjob["template"]["metadata"]["labels"], **extra}, "annotations": extra},
            "spec": spec}


def test_multi_node_is_a_jobset_when_the_cluster_has_the_crd() -> None:
    spec = job_spec(strategy="fsdp")
    [jobset] = children_of(OWNER, spec, plan_on(spec, "A10G", 8), A10G_4, 3,
                           Settings(rendezvous_port=29555), scaleout.JOBSET_API)
    assert admit(jobset_crd(), jobset) == []  # schema, unknown fields, CEL rules of the JobSet CRD v0.12.0
    assert jobset["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and jobset["kind"] == "JobSet"
    name = "support-bot-a3"
    assert jobset["metadata"]["name"] == name and jobset["metadata"]["ownerReferences"] == [OWNER.reference()]
    assert jobset["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"  # Kueue admits the whole set
    assert jobset["spec"]["suspend"] is True
    assert jobset["spec"]["failurePolicy"] == {"maxRestarts": 0}
    assert jobset["spec"]["network"] == {"enableDNSHostnames": True, "publishNotReadyAddresses": True,
                                         "subdomain": name}
    [rjob] = jobset["spec"]["replicatedJobs"]
    assert rjob["name"] == "node" and rjob["replicas"] == 2
    job_spec_ = rjob["template"]["spec"]
    assert (job_spec_["completionMode"], job_spec_["completions"], job_spec_["parallelism"],
            job_spec_["backoffLimit"]) == ("Indexed", 1, 1, 0)
    assert "suspend" not in job_spec_  # the JobSet's, passed on to its Jobs
    assert "kueue.x-k8s.io/queue-name" not in rjob["template"]["metadata"]["labels"]

    c = container({"spec": job_spec_})
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "4"
    command = c["command"]
    flags = dict(zip(command[3:-4:2], command[4:-4:2], strict=False))
    assert flags["--nnodes"] == "2" and flags["--rdzv-id"] == name
    assert flags["--rdzv-endpoint"] == f"{name}-node-0-0.{name}.ml.svc:29555"
    assert flags["--local-addr"] == f"{name}-node-$(KUBETUNE_NODE_INDEX)-0.{name}.ml.svc"
    assert {"name": "KUBETUNE_NODE_INDEX", "valueFrom": {"fieldRef": {
        "fieldPath": "metadata.annotations['jobset.sigs.k8s.io/job-index']"}}} in c["env"]
    assert {"name": "rendezvous", "containerPort": 29555, "protocol": "TCP"} in c["ports"]

    # What the JobSet controller makes of it passes the Kubernetes schemas, and torchrun reads the command.
    from torch.distributed.run import parse_args

    for index in range(2):
        child = child_job_of(jobset, index)
        kubernetes_validate.validate(child, K8S, strict=True)
        assert child["spec"]["template"]["spec"]["subdomain"] == name
    assert parse_args(command[3:]).local_addr == flags["--local-addr"]
    assert scaleout.jobset_job_names(jobset) == [f"{name}-node-0", f"{name}-node-1"]


def test_one_node_stays_a_plain_job_even_where_jobsets_are_served() -> None:
    spec = job_spec(strategy="ddp")
    [job] = children_of(OWNER, spec, plan_on(spec, "A10G", 4), A10G, 1, Settings(),
                        scaleout.JOBSET_API)
    assert job["kind"] == "Job" and "--standalone" in container(job)["command"]


# --- names ---------------------------------------------------------------------------------------------------

NAMES = ["support-bot", "7b-run", "0", "team.a.7b", "v1.2-tune", "a" * 58, "7" * 63,
         "nightly-support-bot-finetune-llama-3-1-8b-instruct-with-long-name", ("x." * 120 + "y")[:253],
         "a-" * 30 + "b"]


@pytest.mark.parametrize("owner_name", NAMES)
@pytest.mark.parametrize("nodes", [2, 11])
def test_multi_node_names_are_valid_service_names_and_hostnames(owner_name: str, nodes: int) -> None:
    """A FineTuneJob name is a DNS-1123 subdomain (a digit first, dots, 253 characters); the Service name must be an
    RFC 1035 label, an Indexed Job's pod hostname `<job>-<index>` a DNS label, a JobSet's Job and pod names RFC 1035
    labels (the JobSet webhook checks `<jobset>-node-<last>-<last>-abcde`), all 63 characters at most."""
    owner = dataclasses.replace(OWNER, name=owner_name)
    spec = job_spec(strategy="ddp")
    plan = plan_on(spec, "A10G", nodes)
    one_per_node = dataclasses.replace(A10G, max_per_node=1)
    service, job = children_of(owner, spec, plan, one_per_node, 12, Settings())
    kubernetes_validate.validate(service, K8S, strict=True)
    kubernetes_validate.validate(job, K8S, strict=True)
    name = service["metadata"]["name"]
    assert job["metadata"]["name"] == name == job["spec"]["template"]["spec"]["subdomain"]
    assert len(name) <= 63 and RFC1035_LABEL.match(name), name
    assert name.endswith("-a12")
    for index in (0, nodes - 1):
        hostname = f"{name}-{index}"
        assert len(hostname) <= 63 and DNS1123_LABEL.match(hostname), hostname
    if RFC1035_LABEL.match(owner_name) and len(owner_name) <= 63 - len(f"-a12-{nodes - 1}"):
        assert name == f"{owner_name}-a12"  # readable names stay as they were
    # The ConfigMap keeps its name (the pods mount it).
    assert {"name": "config", "configMap": {"name": resources.child_name(owner_name, 12)}} in \
        job["spec"]["template"]["spec"]["volumes"]

    [jobset] = children_of(owner, spec, plan, one_per_node, 12, Settings(), scaleout.JOBSET_API)
    assert admit(jobset_crd(), jobset) == []
    js = jobset["metadata"]["name"]
    assert RFC1035_LABEL.match(js) and js.endswith("-a12")
    for job_name in scaleout.jobset_job_names(jobset):
        assert len(job_name) <= 63 and RFC1035_LABEL.match(job_name), job_name
        pod_name = f"{job_name}-0-abcde"
        assert len(pod_name) <= 63 and RFC1035_LABEL.match(pod_name), pod_name


def test_names_that_clean_up_alike_never_collide() -> None:
    names = ["my.job", "my-job", "7b-run", "ft-7b-run", "a" * 70 + "1", "a" * 70 + "2"]
    gangs = {resources.gang_name(n, 1, 61) for n in names}
    assert len(gangs) == len(names), gangs
    assert resources.gang_name("my-job", 1) == resources.child_name("my-job", 1) == "my-job-a1"
    assert resources.gang_name("7b-run", 1).startswith("ft-7b-run-")
    assert resources.gang_name("team.a.7b", 3).startswith("team-a-7b-") and \
        resources.gang_name("team.a.7b", 3).endswith("-a3")
    with pytest.raises(ValueError, match="no room"):
        resources.gang_name("x", 1, 10)


def test_single_node_job_names_are_unchanged() -> None:
    """Jobs that run today keep their names (`<name>-a<n>`), digits first or dots included."""
    for owner_name in ("7b-run", "team.a.7b", "support-bot"):
        owner = dataclasses.replace(OWNER, name=owner_name)
        spec = job_spec(strategy="ddp")
        [job] = children_of(owner, spec, plan_on(spec, "A10G", 4), A10G, 2, Settings())
        assert job["metadata"]["name"] == resources.child_name(owner_name, 2) == f"{owner_name}-a2"


def test_the_trainer_is_told_the_strategy_the_planner_chose_under_auto() -> None:
    """70B under strategy: auto plans FSDP ranks; the trainer shards by its config's spec.resources.strategy, so
    the ConfigMap carries the plan's strategy (the FineTuneJob keeps its own)."""
    import json

    spec = parse_spec({"model": {"name": "meta-llama/Llama-3.1-70B-Instruct"},
                       "dataset": {"source": "s3://datasets/train.jsonl"},
                       "output": {"uri": "s3://adapters/x/", "credentialsSecret": "s3-creds"}})
    plan = make_plan(spec, resolve_architecture(spec.model.name, None), CATALOG)
    assert (spec.resources.strategy, plan.strategy) == ("auto", "fsdp")
    config = json.loads(resources.config_map(OWNER, spec, plan, 1, Settings())["data"]["job.json"])
    assert config["spec"]["resources"]["strategy"] == "fsdp" and config["gpuCount"] == plan.gpu_count
    one = make_plan(spec.model_copy(update={"resources": spec.resources.model_copy(update={"max_gpu_count": 1})}),
                    resolve_architecture(spec.model.name, None), CATALOG)
    config = json.loads(resources.config_map(OWNER, spec, one, 1, Settings())["data"]["job.json"])
    assert one.strategy == "single" and config["spec"]["resources"]["strategy"] == "auto"  # as written
