"""The workload of one attempt, assembled from its pod template for the shape it runs in (pure: dicts out).

The shape (`shape.Shape`, decided once by reconcile._launch) and, across nodes, the gang's names (`gang_for`)
come first; resources.py builds the pod template once from them (command, env, ports, subdomain) with the
workload's metadata (`resources.Workload`); the functions here only assemble the object that runs it:

- One GPU, or a layer split over one node's GPUs: the plain trainer Job (`resources.job`).
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
others waiting in the rendezvous until `join_timeout` (shape.RDZV_JOIN_TIMEOUT), after which they fail. A failed rank
fails the attempt (`backoffLimit: 0` per Job, `maxRestarts: 0` per JobSet: a lone replacement pod cannot rejoin a
running group), and the operator's next attempt (reconcile.py) restarts every rank from the last checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kubetune.planning.gpus import GpuClass
from kubetune.planning.plan import Plan
from kubetune.spec import FineTuneJobSpec
from kubetune.wire import ENV_NODE_INDEX, JOBSET_API, Strategy
from kubetune_operator import resources
from kubetune_operator.settings import Settings
from kubetune_operator.shape import Gang, Shape

REPLICATED_JOB = "node"  # the JobSet's one replicatedJob: one child Job (one pod) per node
JOBSET_JOB_INDEX = "jobset.sigs.k8s.io/job-index"  # the JobSet controller's annotation (and label) on each pod
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"  # the Job controller's, on each Indexed Job pod
POD_NAME_SUFFIX = 6  # "-abcde": the random part the Job controller appends to a pod's name


def indexed_job_gang(owner_name: str, attempt: int, nodes: int) -> Gang:
    """An Indexed Job and its Service, both named so that `<job>-<last index>` is still a hostname; the Job
    controller sets JOB_COMPLETION_INDEX, the pods' subdomain is the Service."""
    name = resources.gang_name(owner_name, attempt, resources.MAX_NAME - len(f"-{nodes - 1}"))
    return Gang(name, name, f"{name}-", "", "JOB_COMPLETION_INDEX", subdomain=name)


def jobset_gang(owner_name: str, attempt: int, nodes: int) -> Gang:
    """A JobSet: child Jobs `<jobset>-node-<i>`, pods `<jobset>-node-<i>-0-xxxxx` (the JobSet webhook's limit); a
    pod's node index comes from its JobSet annotation, its subdomain from the JobSet controller."""
    tail = f"-{REPLICATED_JOB}-{nodes - 1}-0"
    name = resources.gang_name(owner_name, attempt, resources.MAX_NAME - len(tail) - POD_NAME_SUFFIX)
    return Gang(name, name, f"{name}-{REPLICATED_JOB}-", "-0", ENV_NODE_INDEX,
                index_field=f"metadata.annotations['{JOBSET_JOB_INDEX}']")


def gang_for(owner_name: str, attempt: int, shape: Shape, jobset_api: str | None) -> Gang | None:
    """How the pods of `shape` find each other: None on one node, else a JobSet's where the cluster serves
    `jobset_api`, else an Indexed Job's."""
    if not shape.multi_node:
        return None
    if jobset_api == JOBSET_API:
        return jobset_gang(owner_name, attempt, shape.nodes)
    return indexed_job_gang(owner_name, attempt, shape.nodes)


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


def headless_service(parts: resources.Workload, port: int) -> dict[str, Any]:
    """DNS for the Indexed Job's pods (`<job>-<index>.<job>`), the rendezvous port on each."""
    meta = parts.metadata
    pod_labels = parts.template["metadata"]["labels"]
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


def indexed_job(parts: resources.Workload, shape: Shape, port: int) -> list[dict[str, Any]]:
    """The headless Service and the Indexed Job, one pod per node."""
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": parts.metadata,
           "spec": {"suspend": parts.suspend, **resources.job_spec(
               parts, completionMode="Indexed", completions=shape.nodes, parallelism=shape.nodes, backoffLimit=0)}}
    return [headless_service(parts, port), job]


def jobset(parts: resources.Workload, shape: Shape, gang: Gang) -> dict[str, Any]:
    """A JobSet of `shape.nodes` one-pod Indexed Jobs; the JobSet controller makes their headless Service."""
    child = resources.job_spec(parts, completionMode="Indexed", completions=1, parallelism=1, backoffLimit=0)
    return {
        "apiVersion": JOBSET_API,
        "kind": "JobSet",
        "metadata": parts.metadata,
        "spec": {
            # Kueue admits a queued JobSet by unsuspending it (every pod's resources in one Workload); the JobSet
            # passes its suspend flag on to its Jobs.
            "suspend": parts.suspend,
            "network": {"enableDNSHostnames": True, "publishNotReadyAddresses": True, "subdomain": gang.service},
            # A failed child Job (a failed rank) fails the JobSet; the operator's next attempt restarts every rank.
            "failurePolicy": {"maxRestarts": 0},
            "successPolicy": {"operator": "All"},
            "replicatedJobs": [{
                "name": REPLICATED_JOB,
                "replicas": shape.nodes,
                # The child Jobs carry the trainer labels (the operator's watch finds them; trust follows uids).
                "template": {"metadata": {"labels": dict(parts.template["metadata"]["labels"])}, "spec": child},
            }],
        },
    }


def trainer_children(owner: resources.Owner, spec: FineTuneJobSpec, plan: Plan, gpu: GpuClass, shape: Shape,
                     attempt: int, settings: Settings, jobset_api: str | None = None) -> list[dict[str, Any]]:
    """The workload of one attempt of `shape` (after its ConfigMap), in creation order: a Job; for several nodes
    a headless Service and an Indexed Job, or, when the cluster serves `jobset_api`, a JobSet. The last child is
    the one the operator follows (`status.jobName`)."""
    per_node = plan if shape.gpus_per_node == plan.gpu_count else \
        plan.model_copy(update={"gpu_count": shape.gpus_per_node})
    gang = gang_for(owner.name, attempt, shape, jobset_api)
    parts = resources.workload(owner, spec, per_node, gpu, attempt, settings, shape, gang)
    if gang is None:
        return [resources.job(parts)]
    if jobset_api == JOBSET_API:
        return [jobset(parts, shape, gang)]
    return indexed_job(parts, shape, settings.rendezvous_port)


def workload_name(children: list[dict[str, Any]]) -> str:
    """The name of the object that runs the attempt (the Job or JobSet), the last of `trainer_children`."""
    return str(children[-1]["metadata"]["name"])


def jobset_job_names(jobset: Mapping[str, Any]) -> list[str]:
    """The names of a JobSet's child Jobs (`<jobset>-<replicatedJob>-<index>`, as its controller names them)."""
    name = (jobset.get("metadata") or {}).get("name")
    return [f"{name}-{r.get('name')}-{i}" for r in (jobset.get("spec") or {}).get("replicatedJobs") or []
            for i in range(int(r.get("replicas") or 1))]
