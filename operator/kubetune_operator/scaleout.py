"""The shape a distributed plan runs in (pure: dicts in, dicts out).

- One GPU, or a layer split over one node's GPUs: the plain trainer Job of resources.py, unchanged.
- DDP/FSDP on N GPUs of one node: that Job, its pod running torchrun (`kubetune_trainer.launch`, torchrun with
  the trainer's exit codes) with `--standalone --nproc-per-node N`.
- More GPUs than one node of the class has (`maxPerNode` in the GPU catalog): one pod per node, each with
  `--nnodes M --nproc-per-node N` and a c10d rendezvous on pod 0, which the pods find by its DNS name. Two forms:
  - an Indexed Job (`completionMode: Indexed`, parallelism = completions = node count) and a headless Service
    (the pods' subdomain; `publishNotReadyAddresses`, since no pod is ready before the rendezvous);
  - a JobSet (jobset.x-k8s.io/v1alpha2), when the cluster serves that API (`jobset_api`, from discovery): one
    replicatedJob `node` with replicas = node count, each a one-pod Indexed Job; the JobSet controller makes
    the headless Service (`network.enableDNSHostnames`); `failurePolicy.maxRestarts: 0`.
  Each pod passes its own DNS name as torchrun's `--local-addr`: torchrun ranks the nodes by that address
  (sorted), so the pod of index 0 is node rank 0 (global rank 0: the one that serves progress, writes
  checkpoints and the adapter, and whose termination message the operator reads), and the workers' master
  address is that pod's name.

Names (`resources.gang_name`): a Service name is an RFC 1035 label and a pod hostname (`<job>-<index>`, or
`<jobset>-node-<job index>-0`) a DNS label, so the workload's name leaves room for those suffixes.

Gang semantics: all pods of an attempt run together or the attempt fails. With Kueue (the Job or JobSet carries
the queue label and starts suspended) the workload is admitted as one Workload with every pod's resources, so
either all pods get quota or none do; with `waitForPodsReady` Kueue also evicts one whose pods do not all start.
Without Kueue the pods are created together but scheduled one by one; a pod that cannot be placed leaves the
others waiting in the rendezvous until `join_timeout` (RDZV_JOIN_TIMEOUT), after which they fail. A failed rank
fails the attempt (`backoffLimit: 0` per Job, `maxRestarts: 0` per JobSet: a lone replacement pod cannot rejoin a
running group), and the operator's next attempt (reconcile.py) restarts every rank from the last checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubetune.planning.gpus import GpuClass
from kubetune.planning.placement import node_split
from kubetune.planning.plan import Plan
from kubetune.spec import FineTuneJobSpec
from kubetune.wire import CONFIG_PATH, ENV_NODE_INDEX, JOBSET_API, Strategy
from kubetune_operator import resources
from kubetune_operator.settings import Settings

RDZV_JOIN_TIMEOUT = 900  # seconds pods wait for each other (image pulls and model downloads differ per node)
SHUTDOWN_MARGIN = 10  # seconds of the grace period left to torchrun after its ranks' own SIGTERM handling
LAUNCH = ["python", "-m", "kubetune_trainer.launch"]
TRAINER = ["-m", "kubetune_trainer", "--config", CONFIG_PATH]
REPLICATED_JOB = "node"  # the JobSet's one replicatedJob: one child Job (one pod) per node
JOBSET_JOB_INDEX = "jobset.sigs.k8s.io/job-index"  # the JobSet controller's annotation (and label) on each pod
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"  # the Job controller's, on each Indexed Job pod
POD_NAME_SUFFIX = 6  # "-abcde": the random part the Job controller appends to a pod's name


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


@dataclass(frozen=True)
class Gang:
    """How the pods of a multi-node workload are named: pod i's hostname is `host(i)` under the headless Service
    `service`, and its index reaches the container as the environment variable `index_env`."""

    name: str  # the Indexed Job or the JobSet
    service: str  # the headless Service (the pods' subdomain)
    host_prefix: str
    host_suffix: str
    index_env: str

    def host(self, index: int | str) -> str:
        return f"{self.host_prefix}{index}{self.host_suffix}"

    def dns(self, index: int | str, namespace: str) -> str:
        return f"{self.host(index)}.{self.service}.{namespace}.svc"


def indexed_job_gang(owner_name: str, attempt: int, nodes: int) -> Gang:
    """An Indexed Job and its Service, both named so that `<job>-<last index>` is still a hostname."""
    name = resources.gang_name(owner_name, attempt, resources.MAX_NAME - len(f"-{nodes - 1}"))
    return Gang(name, name, f"{name}-", "", "JOB_COMPLETION_INDEX")


def jobset_gang(owner_name: str, attempt: int, nodes: int) -> Gang:
    """A JobSet: child Jobs `<jobset>-node-<i>`, pods `<jobset>-node-<i>-0-xxxxx` (the JobSet webhook's limit)."""
    tail = f"-{REPLICATED_JOB}-{nodes - 1}-0"
    name = resources.gang_name(owner_name, attempt, resources.MAX_NAME - len(tail) - POD_NAME_SUFFIX)
    return Gang(name, name, f"{name}-{REPLICATED_JOB}-", "-0", ENV_NODE_INDEX)


def jobset_api(discovery: Mapping[str, Any] | None) -> str | None:
    """The JobSet API to render, from the cluster's discovery document of the jobset.x-k8s.io group (`GET
    /apis/jobset.x-k8s.io`, None when the group is not served): JOBSET_API when it serves that version."""
    if not discovery:
        return None
    versions = {v.get("groupVersion") for v in discovery.get("versions") or [] if isinstance(v, Mapping)}
    return JOBSET_API if JOBSET_API in versions else None


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


def launch_command(shape: Shape, gang: Gang | None, namespace: str, grace_seconds: int | None,
                   port: int) -> list[str]:
    """`python -m kubetune_trainer.launch [torchrun flags] -m kubetune_trainer --config …` for one pod of `shape`
    (`gang`: how the pods of a multi-node shape find each other; None on one node)."""
    command = [*LAUNCH, "--nproc-per-node", str(shape.gpus_per_node), "--max-restarts", "0"]
    if grace_seconds:
        command += ["--shutdown-timeout", str(max(1, grace_seconds - SHUTDOWN_MARGIN))]
    if shape.multi_node:
        if gang is None:
            raise ValueError("a multi-node shape needs the names of its pods")
        command += ["--nnodes", str(shape.nodes), "--rdzv-backend", "c10d",
                    "--rdzv-endpoint", f"{gang.dns(0, namespace)}:{port}",
                    "--rdzv-id", gang.name, "--rdzv-conf", f"join_timeout={RDZV_JOIN_TIMEOUT}",
                    # $(VAR): Kubernetes expands it from the container's env; ranks follow sorted addresses
                    "--local-addr", gang.dns(f"$({gang.index_env})", namespace)]
    else:
        command += ["--standalone"]
    return command + TRAINER


def headless_service(job: dict[str, Any], port: int) -> dict[str, Any]:
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
            "ports": [{"name": "rendezvous", "port": port, "targetPort": port, "protocol": "TCP"}],
        },
    }


def _torchrun(job: dict[str, Any], shape: Shape, gang: Gang | None, port: int) -> dict[str, Any]:
    """The trainer container of `job` runs torchrun for `shape`; returns the container."""
    pod = job["spec"]["template"]["spec"]
    container: dict[str, Any] = next(c for c in pod["containers"] if c["name"] == resources.CONTAINER)
    container["command"] = launch_command(shape, gang, job["metadata"]["namespace"],
                                          pod.get("terminationGracePeriodSeconds"), port)
    job["metadata"].setdefault("annotations", {})["kubetune.io/shape"] = \
        f"{shape.strategy} {shape.nodes}x{shape.gpus_per_node}"
    if shape.multi_node:
        container["ports"] = [*container.get("ports", []),
                              {"name": "rendezvous", "containerPort": port, "protocol": "TCP"}]
    return container


def _renamed(job: dict[str, Any], name: str) -> dict[str, Any]:
    job["metadata"]["name"] = name
    return job


def indexed_job(job: dict[str, Any], shape: Shape, gang: Gang, port: int) -> list[dict[str, Any]]:
    """The headless Service and the Indexed Job, one pod per node."""
    job = _renamed(job, gang.name)
    _torchrun(job, shape, gang, port)
    job["spec"]["template"]["spec"]["subdomain"] = gang.service
    job["spec"].update({"completionMode": "Indexed", "completions": shape.nodes, "parallelism": shape.nodes,
                        "backoffLimit": 0})
    return [headless_service(job, port), job]


def jobset(job: dict[str, Any], shape: Shape, gang: Gang, port: int) -> dict[str, Any]:
    """A JobSet of `shape.nodes` one-pod Indexed Jobs; the JobSet controller makes their headless Service."""
    meta = job["metadata"]
    container = _torchrun(job, shape, gang, port)
    container["env"] = [*container.get("env", []), {"name": ENV_NODE_INDEX, "valueFrom": {"fieldRef": {
        "fieldPath": f"metadata.annotations['{JOBSET_JOB_INDEX}']"}}}]
    spec = dict(job["spec"])
    suspend = spec.pop("suspend")  # the JobSet's, which it passes on to its Jobs
    spec.update({"completionMode": "Indexed", "completions": 1, "parallelism": 1, "backoffLimit": 0})
    template_labels = dict(spec["template"]["metadata"]["labels"])
    return {
        "apiVersion": JOBSET_API,
        "kind": "JobSet",
        "metadata": {"name": gang.name, "namespace": meta["namespace"], "labels": meta["labels"],
                     "annotations": meta["annotations"], "ownerReferences": meta["ownerReferences"]},
        "spec": {
            # Kueue admits a queued JobSet by unsuspending it (every pod's resources in one Workload).
            "suspend": suspend,
            "network": {"enableDNSHostnames": True, "publishNotReadyAddresses": True, "subdomain": gang.service},
            # A failed child Job (a failed rank) fails the JobSet; the operator's next attempt restarts every rank.
            "failurePolicy": {"maxRestarts": 0},
            "successPolicy": {"operator": "All"},
            "replicatedJobs": [{
                "name": REPLICATED_JOB,
                "replicas": shape.nodes,
                # The child Jobs carry the trainer labels (the operator's watch finds them; trust follows uids).
                "template": {"metadata": {"labels": template_labels}, "spec": spec},
            }],
        },
    }


def trainer_children(owner: resources.Owner, spec: FineTuneJobSpec, plan: Plan, gpu: GpuClass, attempt: int,
                     settings: Settings, jobset_api: str | None = None) -> list[dict[str, Any]]:
    """The workload of one attempt (after its ConfigMap), in creation order: a Job; for several nodes a headless
    Service and an Indexed Job, or, when the cluster serves `jobset_api`, a JobSet. The last child is the one
    the operator follows (`status.jobName`)."""
    shape = shape_of(strategy_of(spec, plan), plan.gpu_count, gpu)
    per_node = plan if shape.gpus_per_node == plan.gpu_count else \
        plan.model_copy(update={"gpu_count": shape.gpus_per_node})
    job = resources.trainer_job(owner, spec, per_node, gpu, attempt, settings)
    port = settings.rendezvous_port
    if not shape.torchrun:
        return [job]
    if not shape.multi_node:
        _torchrun(job, shape, None, port)
        return [job]
    if jobset_api == JOBSET_API:
        return [jobset(job, shape, jobset_gang(owner.name, attempt, shape.nodes), port)]
    return indexed_job(job, shape, indexed_job_gang(owner.name, attempt, shape.nodes), port)


def workload_name(children: list[dict[str, Any]]) -> str:
    """The name of the object that runs the attempt (the Job or JobSet), the last of `trainer_children`."""
    return str(children[-1]["metadata"]["name"])


def jobset_job_names(jobset: Mapping[str, Any]) -> list[str]:
    """The names of a JobSet's child Jobs (`<jobset>-<replicatedJob>-<index>`, as its controller names them)."""
    name = (jobset.get("metadata") or {}).get("name")
    return [f"{name}-{r.get('name')}-{i}" for r in (jobset.get("spec") or {}).get("replicatedJobs") or []
            for i in range(int(r.get("replicas") or 1))]
