"""The shape a distributed plan runs in (pure: dicts in, dicts out).

- One GPU, or a layer split over one node's GPUs: the plain trainer Job of resources.py, unchanged.
- DDP/FSDP on N GPUs of one node: that Job, its pod running torchrun (`kubetune_trainer.launch`, torchrun with
  the trainer's exit codes) with `--standalone --nproc-per-node N`.
- More GPUs than one node of the class has (`maxPerNode` in the GPU catalog): an Indexed Job, one pod per node
  (`completionMode: Indexed`, parallelism = completions = node count), each pod with `--nnodes M
  --nproc-per-node N` and a c10d rendezvous on pod 0, found through a headless Service (the pods' subdomain;
  `publishNotReadyAddresses`, since no pod is ready before the rendezvous).

Gang semantics: all pods of an attempt run together or the attempt fails. With Kueue (the Job carries the
queue label and starts suspended) the Job is admitted as one workload with every pod's resources, so either
all pods get quota or none do; with `waitForPodsReady` Kueue also evicts a Job whose pods do not all start.
Without Kueue the pods are created together but scheduled one by one; a pod that cannot be placed leaves the
others waiting in the rendezvous until `join_timeout` (RDZV_JOIN_TIMEOUT), after which they fail. A failed rank
fails the attempt (`backoffLimit: 0` for a multi-node Job: a lone replacement pod cannot rejoin a running
group), and the operator's next attempt resumes every rank from the last checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from kubetune.planning.gpus import GpuClass
from kubetune.planning.placement import node_split
from kubetune.planning.plan import Plan
from kubetune.spec import FineTuneJobSpec
from kubetune_operator import resources
from kubetune_operator.settings import Settings

RDZV_PORT = 29400
RDZV_JOIN_TIMEOUT = 900  # seconds pods wait for each other (image pulls and model downloads differ per node)
SHUTDOWN_MARGIN = 10  # seconds of the grace period left to torchrun after its ranks' own SIGTERM handling
LAUNCH = ["python", "-m", "kubetune_trainer.launch"]
TRAINER = ["-m", "kubetune_trainer", "--config", f"{resources.CONFIG_MOUNT}/{resources.CONFIG_FILE}"]

Strategy = Literal["single", "pipeline", "ddp", "fsdp"]


@dataclass(frozen=True)
class Shape:
    strategy: Strategy
    nodes: int = 1
    gpus_per_node: int = 1

    @property
    def ranks(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def torchrun(self) -> bool:
        return self.strategy in ("ddp", "fsdp")

    @property
    def multi_node(self) -> bool:
        return self.nodes > 1


def strategy_of(spec: FineTuneJobSpec, plan: Plan) -> Strategy:
    """The plan's strategy: the planner chose it (kubetune.planning.shapes)."""
    return plan.strategy


def shape_of(strategy: Strategy, gpu_count: int, gpu: GpuClass) -> Shape:
    """Nodes x GPUs per node for `gpu_count` GPUs of `gpu`: as few nodes as hold them, the same count on each."""
    if gpu_count < 1:
        raise ValueError(f"gpu_count must be >= 1, got {gpu_count}")
    if strategy in ("single", "pipeline"):
        if gpu_count > gpu.max_per_node:
            raise ValueError(f"{strategy}: {gpu_count} GPUs exceed one {gpu.name} node ({gpu.max_per_node}); "
                             "only ddp and fsdp span nodes")
        return Shape(strategy, 1, gpu_count)
    split = node_split(gpu_count, gpu.max_per_node)  # the planner's own split (kubetune.planning.shapes)
    if split is None:
        nodes = math.ceil(gpu_count / gpu.max_per_node)
        raise ValueError(f"{gpu_count} {gpu.name} GPUs do not split evenly over {nodes} nodes of at most "
                         f"{gpu.max_per_node}")
    return Shape(strategy, *split)


def rendezvous_host(job_name: str, namespace: str) -> str:
    """Pod 0 of the Indexed Job: hostname `<job>-0` under the headless Service `<job>` (its subdomain)."""
    return f"{job_name}-0.{job_name}.{namespace}.svc"


def launch_command(shape: Shape, job_name: str, namespace: str, grace_seconds: int | None) -> list[str]:
    command = [*LAUNCH, "--nproc-per-node", str(shape.gpus_per_node), "--max-restarts", "0"]
    if grace_seconds:
        command += ["--shutdown-timeout", str(max(1, grace_seconds - SHUTDOWN_MARGIN))]
    if shape.multi_node:
        command += ["--nnodes", str(shape.nodes), "--rdzv-backend", "c10d",
                    "--rdzv-endpoint", f"{rendezvous_host(job_name, namespace)}:{RDZV_PORT}",
                    "--rdzv-id", job_name, "--rdzv-conf", f"join_timeout={RDZV_JOIN_TIMEOUT}"]
    else:
        command += ["--standalone"]
    return command + TRAINER


def headless_service(job: dict[str, Any]) -> dict[str, Any]:
    """DNS for the Indexed Job's pods (`<job>-<index>.<job>`), the rendezvous port on each."""
    meta = job["metadata"]
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": meta["name"], "namespace": meta["namespace"],
                     "labels": {k: v for k, v in meta["labels"].items() if k != resources.QUEUE_LABEL},
                     "ownerReferences": meta["ownerReferences"]},
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {resources.LABEL_JOB: pod_labels[resources.LABEL_JOB],
                         resources.LABEL_ATTEMPT: pod_labels[resources.LABEL_ATTEMPT]},
            "ports": [{"name": "rendezvous", "port": RDZV_PORT, "targetPort": RDZV_PORT, "protocol": "TCP"}],
        },
    }


def distribute(job: dict[str, Any], shape: Shape) -> list[dict[str, Any]]:
    """The trainer Job (built for one node's GPUs) made to run `shape`: the children to create, in order."""
    if not shape.torchrun:
        return [job]
    name, namespace = job["metadata"]["name"], job["metadata"]["namespace"]
    pod = job["spec"]["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == resources.CONTAINER)
    container["command"] = launch_command(shape, name, namespace, pod.get("terminationGracePeriodSeconds"))
    job["metadata"].setdefault("annotations", {})["kubetune.io/shape"] = \
        f"{shape.strategy} {shape.nodes}x{shape.gpus_per_node}"
    if not shape.multi_node:
        return [job]
    container["ports"] = [*container.get("ports", []),
                          {"name": "rendezvous", "containerPort": RDZV_PORT, "protocol": "TCP"}]
    pod["subdomain"] = name
    job["spec"].update({"completionMode": "Indexed", "completions": shape.nodes, "parallelism": shape.nodes,
                        "backoffLimit": 0})
    return [headless_service(job), job]


def trainer_children(owner: resources.Owner, spec: FineTuneJobSpec, plan: Plan, gpu: GpuClass, attempt: int,
                     settings: Settings) -> list[dict[str, Any]]:
    """The workload of one attempt (after its ConfigMap): a Job, or a headless Service and an Indexed Job."""
    shape = shape_of(strategy_of(spec, plan), plan.gpu_count, gpu)
    per_node = plan if shape.gpus_per_node == plan.gpu_count else \
        plan.model_copy(update={"gpu_count": shape.gpus_per_node})
    return distribute(resources.trainer_job(owner, spec, per_node, gpu, attempt, settings), shape)
