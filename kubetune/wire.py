"""The protocol between kubetune's processes, declared once: what the operator writes into a trainer pod (paths,
environment, labels, annotations, the port it probes), the Kubernetes API paths it calls, and the words both
sides use for a strategy and an attempt's outcome.

The documents themselves are pydantic models elsewhere in the core: `kubetune.contracts` (the trainer's /status
and termination summary, exit codes, phases, reasons) and `kubetune.trainer_config` (the operator's orders to
the trainer). This module imports only the standard library: the trainer reads it before anything slow is
imported (its SIGTERM handler must be in place first).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

# --- the trainer pod's files ---------------------------------------------------------------------------------
CONFIG_MOUNT = "/etc/kubetune"
"""Where the job's ConfigMap is mounted in the trainer container."""
CONFIG_FILE = "job.json"
"""The ConfigMap key holding the `TrainerConfig` JSON."""
CONFIG_PATH = f"{CONFIG_MOUNT}/{CONFIG_FILE}"
"""`python -m kubetune_trainer --config CONFIG_PATH`: the trainer's default config."""
TERMINATION_LOG = "/dev/termination-log"
"""The container's terminationMessagePath: the trainer writes its `TerminationSummary` there."""

# --- the trainer's port --------------------------------------------------------------------------------------
TRAINER_PORT = 8000
"""The trainer's /metrics, /healthz, /readyz and /status port (the operator probes it, Prometheus scrapes it)."""

# --- environment variables -----------------------------------------------------------------------------------
ENV_CONFIG = "KUBETUNE_CONFIG"
"""The trainer's config path when --config is not given."""
ENV_TRAINER_PORT = "KUBETUNE_TRAINER_PORT"
"""The trainer's port: set by the operator in the trainer pod (and read by the operator as its own setting)."""
ENV_OPERATOR_METRICS_PORT = "KUBETUNE_METRICS_PORT"
"""The operator's own /metrics port (its Deployment's environment)."""
ENV_TRAINER_PORT_LEGACY = ENV_OPERATOR_METRICS_PORT
"""Older operators and trainer images set the trainer's port under the operator's name; the trainer still reads
it when ENV_TRAINER_PORT is unset."""
ENV_TERMINATION_LOG = "KUBETUNE_TERMINATION_LOG"
"""Where the trainer writes its summary when --termination-log is not given."""
ENV_JOB_NAME = "KUBETUNE_JOB_NAME"
ENV_NAMESPACE = "KUBETUNE_NAMESPACE"
ENV_ATTEMPT = "KUBETUNE_ATTEMPT"
ENV_NODE_INDEX = "KUBETUNE_NODE_INDEX"
"""A multi-node attempt's node index (0 is the rendezvous host)."""

# --- labels and annotations ----------------------------------------------------------------------------------
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "kubetune"
NAME_LABEL = "app.kubernetes.io/name"
TRAINER_NAME = "kubetune-trainer"
MANAGED = {MANAGED_BY_LABEL: MANAGED_BY}
"""The label selector of everything the operator creates (it watches its pods, Jobs and JobSets by it)."""
TRAINER_LABELS = {**MANAGED, NAME_LABEL: TRAINER_NAME}
"""The labels of the trainer's ConfigMap, Job and pods."""
JOB_LABEL = "kubetune.io/finetunejob"
"""On every child of a FineTuneJob (ConfigMap, Job, pods) and on its KServe manifest: the owner's name."""
PROMETHEUS_SCRAPE = "prometheus.io/scrape"
PROMETHEUS_PORT = "prometheus.io/port"
"""On the trainer pod: its port, which the operator reads back to poll /status."""
PROMETHEUS_PATH = "prometheus.io/path"

# --- Kubernetes API paths ------------------------------------------------------------------------------------
JOBSET_GROUP = "jobset.x-k8s.io"
JOBSET_VERSION = "v1alpha2"
JOBSET_API = f"{JOBSET_GROUP}/{JOBSET_VERSION}"


def group_path(group: str) -> str:
    """The discovery document of an API group: `/apis/<group>`."""
    return f"/apis/{group}"


def collection_path(api_version: str, plural: str, namespace: str) -> str:
    """A namespaced collection: `/api/v1/namespaces/<ns>/<plural>` for the core group, else
    `/apis/<group>/<version>/namespaces/<ns>/<plural>` (the namespace as given: callers quote it if needed)."""
    root = "/api" if "/" not in api_version else "/apis"
    return f"{root}/{api_version}/namespaces/{namespace}/{plural}"


# --- shared words --------------------------------------------------------------------------------------------
Strategy = Literal["single", "pipeline", "ddp", "fsdp"]
"""How a plan's GPUs train: one GPU, the layer split over one pod's GPUs, or DDP/FSDP ranks."""
RankStrategy = Literal["ddp", "fsdp"]
"""The strategies that run one rank per GPU."""
SpecStrategy = Literal["auto", "ddp", "fsdp"]
"""`spec.resources.strategy`: what a user may ask for."""


class AttemptOutcome(StrEnum):
    """`status.attempts[].outcome`: where one trainer attempt stands, as the operator records it."""

    PENDING = "Pending"
    """Created; no pod runs yet."""
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    OUT_OF_MEMORY = "OutOfMemory"
    """Ran out of GPU memory; the next attempt runs one class up."""
    FAILED = "Failed"

    @property
    def finished(self) -> bool:
        """After a finished attempt the next launch is a new attempt."""
        return self in (AttemptOutcome.SUCCEEDED, AttemptOutcome.OUT_OF_MEMORY, AttemptOutcome.FAILED)
