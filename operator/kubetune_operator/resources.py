"""FineTuneJob + Plan -> the ConfigMap and batch/v1 Job that run the trainer (pure: dicts in, dicts out).

Names are deterministic (`<finetunejob>-a<attempt>`), so a replayed event or a restarted operator asks
for the same objects again and adopts them on 409 instead of creating a second Job.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from kubetune_trainer.config import JobRef, TrainerConfig

from kubetune.contracts import ExitCode
from kubetune.planning.gpus import GPU_RESOURCE, GpuClass
from kubetune.planning.plan import Plan
from kubetune.spec import API_GROUP, API_VERSION, KIND, FineTuneJobSpec
from kubetune_operator.settings import Settings

CONFIG_MOUNT = "/etc/kubetune"
CONFIG_FILE = "job.json"
TERMINATION_LOG = "/dev/termination-log"
CONTAINER = "trainer"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
LABEL_JOB = "kubetune.io/finetunejob"
LABEL_ATTEMPT = "kubetune.io/attempt"
MANAGED_BY = {"app.kubernetes.io/managed-by": "kubetune", "app.kubernetes.io/name": "kubetune-trainer"}
MAX_NAME = 63  # Job names become a pod label value (job-name): 63 characters at most


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


def child_name(owner_name: str, attempt: int) -> str:
    suffix = f"-a{attempt}"
    return owner_name[: MAX_NAME - len(suffix)].rstrip("-.") + suffix


def queue_name(spec: FineTuneJobSpec, labels: dict[str, str]) -> str | None:
    return spec.queue or labels.get(QUEUE_LABEL)


def child_labels(owner: Owner, attempt: int, queue: str | None, settings: Settings) -> dict[str, str]:
    labels = {**settings.extra_labels, **MANAGED_BY, LABEL_JOB: owner.name, LABEL_ATTEMPT: str(attempt)}
    if queue:
        labels[QUEUE_LABEL] = queue
    return labels


def trainer_config(owner: Owner, spec: FineTuneJobSpec, plan: Plan, attempt: int) -> TrainerConfig:
    return TrainerConfig(
        job=JobRef(name=owner.name, namespace=owner.namespace),
        spec=spec,
        knobs=plan.knobs,
        gpu_class=plan.gpu_class,
        gpu_count=plan.gpu_count,
        vram_estimate_bytes=plan.vram_estimate_bytes,
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
            CONFIG_FILE: trainer_config(owner, spec, plan, attempt).model_dump_json(by_alias=True),
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
        {"name": "KUBETUNE_JOB_NAME", "value": owner.name},
        {"name": "KUBETUNE_NAMESPACE", "value": owner.namespace},
        {"name": "KUBETUNE_ATTEMPT", "value": str(attempt)},
        {"name": "KUBETUNE_METRICS_PORT", "value": str(settings.trainer_port)},
        # The container's terminationMessagePath, said explicitly (a kubelet that maps paths can follow it).
        {"name": "KUBETUNE_TERMINATION_LOG", "value": TERMINATION_LOG},
        {"name": "HOME", "value": "/tmp"},
        {"name": "HF_HOME", "value": "/tmp/hf"},
    ]
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


def _memory(quantity: str, count: int) -> str:
    """'12Gi' x 2 -> '24Gi' (a plain multiple keeps the unit)."""
    digits = "".join(ch for ch in quantity if ch.isdigit() or ch == ".")
    unit = quantity[len(digits):]
    value = float(digits) * count
    return f"{int(value) if value.is_integer() else value}{unit}"


def trainer_job(owner: Owner, spec: FineTuneJobSpec, plan: Plan, gpu: GpuClass, attempt: int,
                settings: Settings) -> dict[str, Any]:
    name = child_name(owner.name, attempt)
    queue = queue_name(spec, owner.labels)
    labels = child_labels(owner, attempt, queue, settings)
    pod_labels = child_labels(owner, attempt, None, settings)
    count = plan.gpu_count
    resources = {
        GPU_RESOURCE: str(count),
        "cpu": _memory(settings.cpu_per_gpu, count),
        "memory": _memory(settings.memory_per_gpu, count),
    }
    port = settings.trainer_port
    container = {
        "name": CONTAINER,
        "image": settings.trainer_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["python", "-m", "kubetune_trainer", "--config", f"{CONFIG_MOUNT}/{CONFIG_FILE}"],
        "env": trainer_env(owner, spec, attempt, settings),
        "ports": [{"name": "metrics", "containerPort": port, "protocol": "TCP"}],
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "scratch", "mountPath": "/tmp"},
        ],
        # Loading and quantizing a large model takes minutes: readiness gates traffic, liveness is lenient.
        "startupProbe": {"httpGet": {"path": "/healthz", "port": "metrics"}, "periodSeconds": 10,
                         "failureThreshold": 60},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "metrics"}, "periodSeconds": 20,
                          "timeoutSeconds": 5, "failureThreshold": 6},
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "metrics"}, "periodSeconds": 10,
                           "timeoutSeconds": 5},
        "terminationMessagePath": TERMINATION_LOG,
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
    pod_spec = {
        "restartPolicy": "Never",
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
        ],
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": owner.namespace,
            "labels": labels,
            "annotations": {"kubetune.io/gpu-class": plan.gpu_class},
            "ownerReferences": [owner.reference()],
        },
        "spec": {
            # Kueue admits a queued Job by unsuspending it; spec.suspend pauses it (checkpoints stay in S3).
            "suspend": bool(queue) or spec.suspend,
            "backoffLimit": settings.backoff_limit,
            "podFailurePolicy": {
                "rules": [
                    # Bad input or out of GPU memory: retrying on the same class cannot help.
                    {"action": "FailJob", "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                                          "values": [int(ExitCode.BAD_INPUT), int(ExitCode.OOM)]}},
                    # Preemption, node drain, eviction: not the trainer's fault, not counted.
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                    # SIGTERM without that condition (spot reclaim, node shutdown): the trainer checkpointed
                    # before exiting, so the replacement pod resumes and loses nothing; not counted either.
                    {"action": "Ignore", "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                                         "values": [int(ExitCode.PREEMPTED)]}},
                ]
            },
            "template": {
                "metadata": {
                    "labels": pod_labels,
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(port),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": pod_spec,
            },
        },
    }
