"""FineTuneJob + Plan -> the ConfigMap, and for the attempt's shape (shape.py) the pod template and metadata
(`Workload`, built once) that the trainer's Job is assembled from here (`job`), and its Indexed Job or JobSet in
scaleout.py (pure: dicts out).

Names are deterministic (`<finetunejob>-a<attempt>`), so a replayed event or a restarted operator asks
for the same objects again and adopts them on 409 instead of creating a second Job. A FineTuneJob name
may have 253 characters, but a Job name becomes a pod label value (63 at most): a name too long for its
place keeps a prefix and gains 8 hex digits of its sha256 (`short_name`), so every child name and label
value fits and two long names that share a prefix never collide. The uid label is exact.

A FineTuneJob name is an RFC 1123 subdomain (it may start with a digit and contain dots); a Service name
must be an RFC 1035 label (a letter first, no dots), and an Indexed Job's pods get the hostname
`<job>-<index>` (a DNS label). A multi-node workload is therefore named by `gang_name`: the child name when
it already is such a label with room for the suffixes, else a letter-first, dot-free form with a hash.

Weights reach the pod through the model cache volume (/models; an emptyDir, or the chart's shared PVC):
the trainer downloads a hub id there with HF_ENDPOINT and HF_TOKEN (a secretKeyRef, never a value).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from kubetune import wire
from kubetune.contracts import ExitCode
from kubetune.planning.budget import PodBudget, pod_budget, quantity, quantity_bytes, split_quantity
from kubetune.planning.gpus import GPU_RESOURCE, GpuClass
from kubetune.planning.plan import Plan
from kubetune.spec import API_GROUP, API_VERSION, KIND, FineTuneJobSpec
from kubetune.trainer_config import JobRef, TrainerConfig
from kubetune_operator.settings import Settings
from kubetune_operator.shape import Gang, Shape, trainer_command

CONTAINER = "trainer"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
LABEL_JOB = wire.JOB_LABEL
LABEL_ATTEMPT = "kubetune.io/attempt"
LABEL_UID = "kubetune.io/finetunejob-uid"
MODEL_CACHE = "/models"  # the model cache volume; the trainer's HF_HUB_CACHE is MODEL_CACHE/hub
MAX_NAME = 63  # Job names become a pod label value (job-name): 63 characters at most
RFC1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")  # Service names; DNS hostnames (letter first)
GANG_PREFIX = "ft-"  # put before a FineTuneJob name that does not start with a letter (Service names must)


@dataclass(frozen=True)
class Owner:
    """The FineTuneJob the children belong to."""

    name: str
    namespace: str
    uid: str
    labels: dict[str, str]

    def reference(self) -> dict[str, Any]:
        return {
            "apiVersion": f"{API_GROUP}/{API_VERSION}",
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


def short_name(name: str, room: int = MAX_NAME) -> str:
    """`name` if it has at most `room` characters, else a prefix + '-' + 8 hex digits of its sha256."""
    if len(name) <= room:
        return name
    return name[: room - 9].rstrip("-.") + "-" + hashlib.sha256(name.encode()).hexdigest()[:8]


def job_label(owner_name: str) -> str:
    """The `kubetune.io/finetunejob` label value: the name, or its hashed short form past 63 characters."""
    return short_name(owner_name)


def child_name(owner_name: str, attempt: int) -> str:
    """`<name>-a<attempt>`, at most 63 characters; the same for a name and for its label value."""
    suffix = f"-a{attempt}"
    return short_name(job_label(owner_name), MAX_NAME - len(suffix)) + suffix


def gang_name(owner_name: str, attempt: int, room: int = MAX_NAME) -> str:
    """The name of a multi-node attempt's workload (its headless Service, Indexed Job or JobSet): an RFC 1035
    label of at most `room` characters (the caller leaves room for what Kubernetes appends, such as `-<index>`
    of a pod hostname). It is `child_name` whenever that already qualifies, so the usual names read the same
    as the ConfigMap's; otherwise (a name that starts with a digit, holds a dot, or is too long) it is
    `ft-` + the name with dots as dashes, cut to fit, + 8 hex digits of the FineTuneJob name's sha256 (two
    names that clean up alike never collide) + `-a<attempt>`."""
    suffix = f"-a{attempt}"
    if room < len(GANG_PREFIX) + 10 + len(suffix):
        raise ValueError(f"no room for a workload name in {room} characters")
    plain = child_name(owner_name, attempt)
    if len(plain) <= room and RFC1035_LABEL.match(plain):
        return plain
    clean = re.sub(r"[^a-z0-9-]+", "-", owner_name.lower()).strip("-")
    if not clean[:1].isalpha():
        clean = GANG_PREFIX + clean
    digest = hashlib.sha256(owner_name.encode()).hexdigest()[:8]
    keep = room - len(suffix) - 9
    return f"{clean[:keep].rstrip('-')}-{digest}{suffix}"


def queue_name(spec: FineTuneJobSpec, labels: dict[str, str]) -> str | None:
    return spec.queue or labels.get(QUEUE_LABEL)


def child_labels(owner: Owner, attempt: int, queue: str | None, settings: Settings) -> dict[str, str]:
    labels = {**settings.extra_labels, **wire.TRAINER_LABELS, LABEL_JOB: job_label(owner.name),
              LABEL_ATTEMPT: str(attempt)}
    if owner.uid:
        labels[LABEL_UID] = owner.uid
    if queue:
        labels[QUEUE_LABEL] = queue
    return labels


def trainer_config(owner: Owner, spec: FineTuneJobSpec, plan: Plan, attempt: int) -> TrainerConfig:
    """The trainer's config. Its spec's `resources.strategy` is the plan's when the plan runs DDP or FSDP ranks: under
    `strategy: auto` the planner chose it, and the trainer shards (or not) by that field. The resume key leaves
    resources out, so a re-planned shape still resumes from the checkpoint."""
    if plan.strategy in ("ddp", "fsdp") and spec.resources.strategy != plan.strategy:
        spec = spec.model_copy(update={"resources": spec.resources.model_copy(update={"strategy": plan.strategy})})
    return TrainerConfig(
        job=JobRef(name=owner.name, namespace=owner.namespace),
        spec=spec,
        knobs=plan.knobs,
        gpu_class=plan.gpu_class,
        gpu_count=plan.gpu_count,
        vram_estimate_bytes=plan.vram_estimate_bytes,
        device="cuda" if plan.gpu_class else None,  # a GPU plan: no usable CUDA in the pod exits 5, never the CPU
        attempt=attempt,
    )


def config_map(owner: Owner, spec: FineTuneJobSpec, plan: Plan, attempt: int, settings: Settings) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": child_name(owner.name, attempt),
            "namespace": owner.namespace,
            "labels": child_labels(owner, attempt, None, settings),
            "ownerReferences": [owner.reference()],
        },
        "data": {
            wire.CONFIG_FILE: trainer_config(owner, spec, plan, attempt).model_dump_json(by_alias=True),
            "plan.json": json.dumps(plan.summary(), sort_keys=True),
        },
    }


def node_affinity(gpu: GpuClass) -> dict[str, Any]:
    """One nodeSelectorTerm per label set of the class (terms are ORed): GFD, EKS, GKE and AKS nodes all match."""
    terms = [
        {"matchExpressions": [{"key": k, "operator": "In", "values": [v]} for k, v in sorted(labels.items())]}
        for labels in gpu.node_labels
    ]
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}}}


def _secret_env(name: str, secret: str, key: str, optional: bool) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": optional}}}


def trainer_env(owner: Owner, spec: FineTuneJobSpec, attempt: int, settings: Settings) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": wire.ENV_JOB_NAME, "value": owner.name},
        {"name": wire.ENV_NAMESPACE, "value": owner.namespace},
        {"name": wire.ENV_ATTEMPT, "value": str(attempt)},
        {"name": wire.ENV_TRAINER_PORT, "value": str(settings.trainer_port)},
        # The container's terminationMessagePath, said explicitly (a kubelet that maps paths can follow it).
        {"name": wire.ENV_TERMINATION_LOG, "value": wire.TERMINATION_LOG},
        {"name": "HOME", "value": "/tmp"},
        {"name": "HF_HOME", "value": "/tmp/hf"},
        {"name": "HF_HUB_CACHE", "value": f"{MODEL_CACHE}/hub"},
        {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"},
    ]
    if settings.hf_endpoint:
        env.append({"name": "HF_ENDPOINT", "value": settings.hf_endpoint})
    token = spec.model.token_secret
    if token is not None:
        env.append(_secret_env("HF_TOKEN", token.name, token.key, optional=False))
    elif settings.hf_token_secret:  # the chart-wide default may not exist in every namespace
        name, _, key = settings.hf_token_secret.partition("/")
        env.append(_secret_env("HF_TOKEN", name, key or "HF_TOKEN", optional=True))
    endpoint = spec.output.endpoint_url or settings.default_s3_endpoint
    secret = spec.output.credentials_secret
    if secret:
        env.append(_secret_env("AWS_ACCESS_KEY_ID", secret, "AWS_ACCESS_KEY_ID", optional=False))
        env.append(_secret_env("AWS_SECRET_ACCESS_KEY", secret, "AWS_SECRET_ACCESS_KEY", optional=False))
        if not endpoint:
            env.append(_secret_env("AWS_ENDPOINT_URL", secret, "AWS_ENDPOINT_URL", optional=True))
    if endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": endpoint})
    return env


def _memory(text: str, count: int) -> str:
    """'12Gi' x 2 -> '24Gi' (a plain multiple keeps the unit)."""
    value, unit = split_quantity(text)
    value *= count
    return f"{int(value) if value.is_integer() else value}{unit}"


def pod_failure_policy() -> dict[str, Any]:
    """Which pod failures fail the Job at once, and which do not count against its backoffLimit."""
    return {
        "rules": [
            # Bad input, out of GPU memory, no usable CUDA on the node (driver): retrying cannot help.
            {"action": "FailJob", "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                                  "values": [int(ExitCode.BAD_INPUT), int(ExitCode.OOM),
                                                             int(ExitCode.NO_GPU)]}},
            # Preemption, node drain, eviction: not the trainer's fault, not counted.
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            # SIGTERM without that condition (spot reclaim, node shutdown): the trainer checkpointed
            # before exiting, so the replacement pod resumes and loses nothing; not counted either.
            {"action": "Ignore", "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                                 "values": [int(ExitCode.PREEMPTED)]}},
        ]
    }


def plan_budget(spec: FineTuneJobSpec, plan: Plan, settings: Settings) -> PodBudget:
    """What the pod needs besides GPUs (kubetune.planning.budget), for the plan's GPUs on one node."""
    knobs = plan.knobs
    return pod_budget(plan.model_params, plan.lora_params,
                      knobs.micro_batch_size * knobs.gradient_accumulation_steps * knobs.max_seq_length,
                      knobs.gradient_checkpointing, plan.gpu_count, cache_on_volume=bool(settings.model_cache_claim),
                      method=spec.method, sharded=plan.strategy == "fsdp" and plan.gpu_count > 1,
                      merged=spec.output.merged_model, largest_weight_params=plan.largest_weight_params)


def container_resources(plan: Plan, settings: Settings, budget: PodBudget) -> dict[str, str]:
    """Requests = limits: GPUs, and CPU and memory per GPU (memory: at least what FSDP ranks need to load)."""
    count = plan.gpu_count
    memory = _memory(settings.memory_per_gpu, count)
    if budget.host_memory_bytes > quantity_bytes(memory):  # FSDP ranks each load the model into host memory
        memory = quantity(budget.host_memory_bytes)
    return {GPU_RESOURCE: str(count), "cpu": _memory(settings.cpu_per_gpu, count), "memory": memory}


def trainer_container(owner: Owner, spec: FineTuneJobSpec, plan: Plan, attempt: int, settings: Settings,
                      budget: PodBudget, shape: Shape, gang: Gang | None) -> dict[str, Any]:
    """The trainer container of one pod of `shape`: its command (the trainer, or torchrun over its ranks), env
    (with the pod's node index where `gang` reads it from a field), ports (with the rendezvous port across nodes)."""
    resources = container_resources(plan, settings, budget)
    port = settings.trainer_port
    rendezvous = settings.rendezvous_port
    ports = [{"name": "metrics", "containerPort": port, "protocol": "TCP"}]
    if shape.multi_node:
        ports.append({"name": "rendezvous", "containerPort": rendezvous, "protocol": "TCP"})
    return {
        "name": CONTAINER,
        "image": settings.trainer_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": trainer_command(shape, gang, owner.namespace, budget.grace_period_seconds, rendezvous),
        "env": [*trainer_env(owner, spec, attempt, settings), *(gang.index_env_var() if gang else [])],
        "ports": ports,
        # ephemeral-storage: the emptyDir model cache (the weights on disk) + checkpoint staging + scratch
        "resources": {"requests": {**resources, "ephemeral-storage": quantity(budget.ephemeral_storage_bytes)},
                      "limits": dict(resources)},
        "volumeMounts": [
            {"name": "config", "mountPath": wire.CONFIG_MOUNT, "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "scratch", "mountPath": "/tmp"},
            {"name": "model-cache", "mountPath": MODEL_CACHE},
        ],
        # Loading and quantizing a large model takes minutes: readiness gates traffic, liveness is lenient.
        "startupProbe": {"httpGet": {"path": "/healthz", "port": "metrics"}, "periodSeconds": 10,
                         "failureThreshold": 60},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "metrics"}, "periodSeconds": 20,
                          "timeoutSeconds": 5, "failureThreshold": 6},
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "metrics"}, "periodSeconds": 10,
                           "timeoutSeconds": 5},
        "terminationMessagePath": wire.TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "readOnlyRootFilesystem": True,  # writable: /tmp and /dev/shm only, both size-limited emptyDirs
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }


def trainer_pod_spec(name: str, gpu: GpuClass, container: dict[str, Any], settings: Settings,
                     budget: PodBudget, gang: Gang | None) -> dict[str, Any]:
    cache_volume: dict[str, Any] = (
        {"name": "model-cache", "persistentVolumeClaim": {"claimName": settings.model_cache_claim}}
        if settings.model_cache_claim else
        {"name": "model-cache", "emptyDir": {"sizeLimit": quantity(budget.model_cache_bytes)}})
    subdomain = {"subdomain": gang.subdomain} if gang and gang.subdomain else {}
    return {
        "restartPolicy": "Never",
        # SIGTERM -> finish the step, write and upload a checkpoint (kubetune.planning.budget), then SIGKILL
        "terminationGracePeriodSeconds": budget.grace_period_seconds,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": settings.run_as_user,
            "runAsGroup": settings.run_as_user,
            "fsGroup": settings.run_as_user,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "affinity": node_affinity(gpu),
        "tolerations": [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}],
        "containers": [container],
        "volumes": [
            {"name": "config", "configMap": {"name": name}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": settings.shm_size}},
            {"name": "scratch", "emptyDir": {"sizeLimit": settings.scratch_size}},
            cache_volume,
        ],
        **subdomain,  # a multi-node pod's hostname resolves under the headless Service
    }


@dataclass(frozen=True)
class Workload:
    """What each form of an attempt's workload (a Job, an Indexed Job, a JobSet) is assembled from, decided once:
    the metadata of the object that runs it, its pod template, and whether it starts suspended."""

    metadata: dict[str, Any]  # name, namespace, labels (the queue's too), annotations, ownerReferences
    template: dict[str, Any]  # one pod: labels (no queue label), scrape annotations, spec
    suspend: bool  # Kueue admits a queued workload by unsuspending it; spec.suspend pauses it
    backoff_limit: int


def workload(owner: Owner, spec: FineTuneJobSpec, plan: Plan, gpu: GpuClass, attempt: int, settings: Settings,
             shape: Shape, gang: Gang | None = None) -> Workload:
    """The parts of the attempt's workload for one pod of `shape` (`plan`: one node's GPUs) named `gang.name`
    across nodes, else `<name>-a<attempt>`."""
    queue = queue_name(spec, owner.labels)
    budget = plan_budget(spec, plan, settings)
    container = trainer_container(owner, spec, plan, attempt, settings, budget, shape, gang)
    annotations = {"kubetune.io/gpu-class": plan.gpu_class}
    if shape.torchrun:
        annotations["kubetune.io/shape"] = shape.label
    metadata = {
        "name": gang.name if gang else child_name(owner.name, attempt),
        "namespace": owner.namespace,
        "labels": child_labels(owner, attempt, queue, settings),
        "annotations": annotations,
        "ownerReferences": [owner.reference()],
    }
    template = {
        "metadata": {
            "labels": child_labels(owner, attempt, None, settings),
            "annotations": {
                wire.PROMETHEUS_SCRAPE: "true",
                wire.PROMETHEUS_PORT: str(settings.trainer_port),
                wire.PROMETHEUS_PATH: "/metrics",
            },
        },
        "spec": trainer_pod_spec(child_name(owner.name, attempt), gpu, container, settings, budget, gang),
    }
    return Workload(metadata, template, bool(queue) or spec.suspend, settings.backoff_limit)


def job_spec(parts: Workload, **form: Any) -> dict[str, Any]:
    """A batch/v1 Job spec around the pod template (`form`: what an Indexed Job adds, backoffLimit overridden)."""
    return {"backoffLimit": parts.backoff_limit, "podFailurePolicy": pod_failure_policy(),
            "template": parts.template} | form


def job(parts: Workload) -> dict[str, Any]:
    """The plain trainer Job (one pod; restarted up to the backoff limit)."""
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": parts.metadata,
            "spec": {"suspend": parts.suspend, **job_spec(parts)}}


def trainer_job(owner: Owner, spec: FineTuneJobSpec, plan: Plan, gpu: GpuClass, attempt: int, settings: Settings,
                shape: Shape) -> dict[str, Any]:
    """The one-node trainer Job of `shape` (scaleout.trainer_children picks the form for every shape)."""
    return job(workload(owner, spec, plan, gpu, attempt, settings, shape))
