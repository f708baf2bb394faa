"""The shapes a plan runs in: one pod with torchrun over one node's GPUs, or a headless Service plus an Indexed
Job over several nodes; every object validated against the Kubernetes schemas."""

from __future__ import annotations

import dataclasses
from typing import Any

import kubernetes_validate
import pytest
from kubetune_operator import resources, scaleout
from kubetune_operator.scaleout import Shape, shape_of
from kubetune_operator.settings import Settings

from kubetune.planning.gpus import load_catalog
from kubetune.planning.models import resolve_architecture
from kubetune.planning.placement import Inventory, NodeInfo, place
from kubetune.planning.plan import make_plan
from kubetune.planning.ranks import plan_strategy
from kubetune.spec import parse_spec

CATALOG = load_catalog()
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
    children = scaleout.trainer_children(OWNER, spec, plan_on(spec, "A10G", 4), A10G, 1, Settings())
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
    job, = scaleout.trainer_children(OWNER, spec, plan_on(spec, "A10G", 2), A10G, 1, Settings())
    assert container(job)["command"][:3] == ["python", "-m", "kubetune_trainer"]


def test_multi_node_is_an_indexed_job_with_a_headless_service_for_rendezvous() -> None:
    spec = job_spec(strategy="fsdp")
    service, job = scaleout.trainer_children(OWNER, spec, plan_on(spec, "A10G", 8), A10G_4, 3, Settings())
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
    assert {"name": "rendezvous", "containerPort": 29400, "protocol": "TCP"} in c["ports"]
    assert job["metadata"]["annotations"]["kubetune.io/shape"] == "fsdp 2x4"


def test_the_launcher_accepts_the_command_the_operator_writes() -> None:
    """The flags are torchrun's own: its parser reads them as the pod will."""
    from torch.distributed.run import parse_args

    spec = job_spec(strategy="fsdp")
    _, job = scaleout.trainer_children(OWNER, spec, plan_on(spec, "A10G", 8), A10G_4, 1, Settings())
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
    _, job = scaleout.trainer_children(OWNER, spec, plan, two_per_node, 1, Settings())
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["parallelism"] == plan.gpu_count // 2


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
