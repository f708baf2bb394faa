"""The shape one attempt runs in, decided once per launch (reconcile._launch) and passed down (pure).

- `Shape`: nodes x GPUs per node and the strategy, from the plan's strategy and GPU count and the class's
  `maxPerNode` (`shape_of`, the planner's own node split).
- `Gang`: for several nodes, how the pods are named and find each other (the workload's name, the headless
  Service that is their subdomain, pod i's hostname, the environment variable that carries its index).
- `trainer_command`: the trainer container's command for one pod of a shape: `python -m kubetune_trainer`, or
  torchrun (`kubetune_trainer.launch`, torchrun with the trainer's exit codes) with `--standalone` on one node and
  a c10d rendezvous on pod 0 across nodes (scaleout.py says why each flag is there).

resources.py builds the pod template from these; scaleout.py assembles the Job, Indexed Job or JobSet from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from kubetune.planning.gpus import GpuClass
from kubetune.planning.placement import node_split
from kubetune.wire import CONFIG_PATH, Strategy

RDZV_JOIN_TIMEOUT = 900  # seconds pods wait for each other (image pulls and model downloads differ per node)
SHUTDOWN_MARGIN = 10  # seconds of the grace period left to torchrun after its ranks' own SIGTERM handling
LAUNCH = ["python", "-m", "kubetune_trainer.launch"]
TRAINER = ["-m", "kubetune_trainer", "--config", CONFIG_PATH]


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

    @property
    def label(self) -> str:
        """'fsdp 2x4': the `kubetune.io/shape` annotation of a workload that runs torchrun."""
        return f"{self.strategy} {self.nodes}x{self.gpus_per_node}"


@dataclass(frozen=True)
class Gang:
    """How the pods of a multi-node workload are named: pod i's hostname is `host(i)` under the headless Service
    `service`, and its index reaches the container as the environment variable `index_env` (read from the pod's
    field `index_field` when the workload's controller does not set that variable itself)."""

    name: str  # the Indexed Job or the JobSet
    service: str  # the headless Service (the pods' subdomain)
    host_prefix: str
    host_suffix: str
    index_env: str
    index_field: str | None = None  # e.g. a JobSet pod's annotation; None: the controller sets `index_env`
    subdomain: str | None = None  # the pods' spec.subdomain, when the workload's controller does not set it

    def host(self, index: int | str) -> str:
        return f"{self.host_prefix}{index}{self.host_suffix}"

    def dns(self, index: int | str, namespace: str) -> str:
        return f"{self.host(index)}.{self.service}.{namespace}.svc"

    def index_env_var(self) -> list[dict[str, Any]]:
        """The container's env entry that carries the pod's index ([] when the controller sets it)."""
        if self.index_field is None:
            return []
        return [{"name": self.index_env, "valueFrom": {"fieldRef": {"fieldPath": self.index_field}}}]


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


def trainer_command(shape: Shape, gang: Gang | None, namespace: str, grace_seconds: int | None,
                    port: int) -> list[str]:
    """The trainer container's command for one pod of `shape`: the trainer itself, or torchrun over its ranks."""
    if not shape.torchrun:
        return ["python", *TRAINER]
    return launch_command(shape, gang, namespace, grace_seconds, port)
