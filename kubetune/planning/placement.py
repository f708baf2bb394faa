"""Plan + cluster inventory -> where the job can run now, or why not (pure: no I/O).

The operator builds an `Inventory` from Nodes (labels, allocatable `nvidia.com/gpu`, schedulability)
and from the GPUs that non-terminated pods already hold, then calls `place()`:

- `Placed`: some node of the planned class has `gpuCount` free GPUs now.
- `Busy`: nodes of the class exist and are big enough, but their GPUs are taken; the Job is created
  and the scheduler (or Kueue) starts it when GPUs free up.
- `NoNodes`: no node of the class (big enough) exists; the reason names the class, the labels that
  identify it, and what the cluster has instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from kubetune.planning.gpus import GPU_RESOURCE, GpuCatalog, GpuClass

PlacementKind = Literal["Placed", "Busy", "NoNodes"]


@dataclass(frozen=True)
class NodeInfo:
    name: str
    labels: Mapping[str, str]
    allocatable_gpus: int
    schedulable: bool = True


@dataclass(frozen=True)
class Inventory:
    nodes: tuple[NodeInfo, ...] = ()
    gpus_in_use: Mapping[str, int] = field(default_factory=dict)  # node name -> GPUs held by live pods

    def free_gpus(self, node: NodeInfo) -> int:
        return max(0, node.allocatable_gpus - self.gpus_in_use.get(node.name, 0))


@dataclass(frozen=True)
class Placement:
    kind: PlacementKind
    gpu_class: str
    gpu_count: int
    nodes: tuple[str, ...] = ()  # nodes that can take the pod now (Placed only)
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.kind != "NoNodes"


def parse_quantity_int(value: Any) -> int:
    """Allocatable GPU counts are plain integers ("8"); anything else counts as none."""
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return 0


def node_info(node: Mapping[str, Any]) -> NodeInfo:
    """A Node object (dict) -> NodeInfo. Cordoned or NotReady nodes are not schedulable."""
    meta = node.get("metadata") or {}
    spec = node.get("spec") or {}
    status = node.get("status") or {}
    conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    ready = conditions.get("Ready", "True") == "True"
    return NodeInfo(
        name=str(meta.get("name", "")),
        labels=dict(meta.get("labels") or {}),
        allocatable_gpus=parse_quantity_int((status.get("allocatable") or {}).get(GPU_RESOURCE, 0)),
        schedulable=ready and not spec.get("unschedulable", False),
    )


def pod_gpus(pod: Mapping[str, Any]) -> tuple[str | None, int]:
    """(node name, GPUs held) for a pod; 0 for pods that finished (they hold nothing)."""
    status = pod.get("status") or {}
    if status.get("phase") in ("Succeeded", "Failed"):
        return None, 0
    spec = pod.get("spec") or {}
    total = 0
    for container in spec.get("containers") or []:
        resources = container.get("resources") or {}
        wanted = (resources.get("limits") or {}).get(GPU_RESOURCE) or (resources.get("requests") or {}).get(
            GPU_RESOURCE
        )
        total += parse_quantity_int(wanted or 0)
    return spec.get("nodeName"), total


def inventory_of(nodes: Iterable[Mapping[str, Any]], pods: Iterable[Mapping[str, Any]]) -> Inventory:
    in_use: dict[str, int] = {}
    for pod in pods:
        node, gpus = pod_gpus(pod)
        if node and gpus:
            in_use[node] = in_use.get(node, 0) + gpus
    return Inventory(tuple(node_info(n) for n in nodes), in_use)


def node_split(gpus: int, per_node: int) -> tuple[int, int] | None:
    """`gpus` GPUs of a class whose nodes hold `per_node` (the catalog's maxPerNode) as (nodes, GPUs on each): as
    few nodes as hold them, the same count on each; None when they do not split evenly (6 over nodes of 4: 2 x 3;
    5 over nodes of 4: None). The planner and the operator's workload shape (kubetune_operator.shape.shape_of)
    both use it."""
    if gpus < 1 or per_node < 1:
        return None
    nodes = -(-gpus // per_node)
    return None if gpus % nodes else (nodes, gpus // nodes)


@dataclass(frozen=True)
class Supply:
    """The GPU classes a cluster offers: those with schedulable nodes now (the most GPUs one node has, and each
    node's GPU count), and those the platform can provision from zero. The planner chooses among these
    (kubetune.planning.plan); a shape over several nodes needs that many nodes with enough GPUs each."""

    nodes: tuple[tuple[str, int], ...] = ()  # (class, most allocatable GPUs on one schedulable node), sorted
    provisionable: frozenset[str] = frozenset()
    # (class, allocatable GPUs of each schedulable node, largest first); a class listed in `nodes` only counts
    # as one node of its largest size
    node_gpus: tuple[tuple[str, tuple[int, ...]], ...] = ()

    def sizes(self, name: str) -> tuple[int, ...]:
        """Allocatable GPUs of each schedulable node of the class, largest first (empty: no node)."""
        sizes = dict(self.node_gpus).get(name)
        if sizes is not None:
            return sizes
        most = dict(self.nodes).get(name)
        return (most,) if most else ()

    def why_not(self, gpu: GpuClass, count: int, nodes: int = 1) -> str | None:
        """None when `nodes` nodes of the class with `count` GPUs each can be had (now, or provisioned);
        otherwise the reason, for the plan."""
        if gpu.name in self.provisionable:
            return None
        sizes = self.sizes(gpu.name)
        if not sizes:
            return f"{gpu.name}: no nodes in the cluster and not provisionable"
        big_enough = sum(1 for n in sizes if n >= count)
        if big_enough >= nodes:
            return None
        hint = ""
        if count > sizes[0] and gpu.max_per_node > sizes[0]:
            hint = (f" (the GPU catalog says {gpu.max_per_node} per node: set maxPerNode: {sizes[0]} for "
                    f"{gpu.name} to spread larger shapes over several nodes)")
        if nodes == 1:
            return (f"{gpu.name}: its nodes have at most {sizes[0]} GPU{'s' if sizes[0] > 1 else ''} and it is "
                    f"not provisionable{hint}")
        have = ", ".join(map(str, sizes))
        return (f"{gpu.name}: {nodes * count} GPUs as {nodes} nodes x {count} need {nodes} nodes with {count} "
                f"allocatable GPUs each; {big_enough} of its nodes have that many (GPUs per node: {have}) and "
                f"it is not provisionable{hint}")


def supply_of(inventory: Inventory, catalog: GpuCatalog) -> Supply:
    sizes: dict[str, list[int]] = {}
    for node in inventory.nodes:
        gpu = catalog.class_of_node(dict(node.labels))
        if gpu is not None and node.schedulable and node.allocatable_gpus > 0:
            sizes.setdefault(gpu.name, []).append(node.allocatable_gpus)
    return Supply(tuple(sorted((name, max(n)) for name, n in sizes.items())),
                  frozenset(g.name for g in catalog.classes if g.provisionable),
                  tuple(sorted((name, tuple(sorted(n, reverse=True))) for name, n in sizes.items())))


def _labels_text(gpu: GpuClass) -> str:
    sets = [",".join(f"{k}={v}" for k, v in labels.items()) for labels in gpu.node_labels]
    return " or ".join(sets) if sets else "(no node labels in the catalog)"


def describe_cluster(inventory: Inventory, catalog: GpuCatalog) -> str:
    """'2x L4 (2/2 GPUs free), 1x H100-80GB (8/8 GPUs free), 3 nodes without a known GPU class'."""
    by_class: dict[str, list[NodeInfo]] = {}
    unknown = 0
    for node in inventory.nodes:
        gpu = catalog.class_of_node(dict(node.labels))
        if gpu is None:
            unknown += 1
        else:
            by_class.setdefault(gpu.name, []).append(node)
    parts = []
    for name in catalog.names:
        nodes = by_class.get(name)
        if not nodes:
            continue
        total = sum(n.allocatable_gpus for n in nodes if n.schedulable)
        free = sum(inventory.free_gpus(n) for n in nodes if n.schedulable)
        parts.append(f"{len(nodes)}x {name} ({free}/{total} GPUs free)")
    if unknown:
        parts.append(f"{unknown} node{'s' if unknown > 1 else ''} without a known GPU class")
    return ", ".join(parts) if parts else "no nodes"


def place(gpu_class: str, gpu_count: int, inventory: Inventory, catalog: GpuCatalog, nodes: int = 1) -> Placement:
    """Can `gpu_count` GPUs of `gpu_class` on one node (on each of `nodes` nodes: a multi-node job) be had now,
    later, or never (with today's nodes)?"""
    gpu = catalog.get(gpu_class, "status.plan.gpuClass")
    of_class = [n for n in inventory.nodes if gpu.matches(dict(n.labels)) and n.schedulable]
    cluster = describe_cluster(inventory, catalog)
    want = f"{gpu_count}x {gpu.name}" if gpu_count > 1 else gpu.name
    if nodes > 1:
        want = f"{want} on each of {nodes} nodes"
    if not of_class:
        return Placement(
            "NoNodes", gpu.name, gpu_count,
            message=f"no schedulable {gpu.name} node in the cluster (nodes labelled {_labels_text(gpu)}); "
                    f"the cluster has: {cluster}",
        )
    big_enough = [n for n in of_class if n.allocatable_gpus >= gpu_count]
    if nodes > 1 and len(big_enough) < nodes:
        return Placement(
            "NoNodes", gpu.name, gpu_count,
            message=f"the plan needs {want} but only {len(big_enough)} {gpu.name} node(s) have {gpu_count} "
                    f"allocatable {GPU_RESOURCE}; the cluster has: {cluster}",
        )
    if not big_enough:
        most = max(n.allocatable_gpus for n in of_class)
        return Placement(
            "NoNodes", gpu.name, gpu_count,
            message=f"the plan needs {want} on one node but {gpu.name} nodes have at most {most} "
                    f"allocatable {GPU_RESOURCE}; the cluster has: {cluster}",
        )
    ready = tuple(sorted(n.name for n in big_enough if inventory.free_gpus(n) >= gpu_count))
    if len(ready) >= nodes:
        return Placement("Placed", gpu.name, gpu_count, ready,
                         message=f"{want} free now on {len(ready)} node{'s' if len(ready) > 1 else ''}")
    return Placement(
        "Busy", gpu.name, gpu_count,
        message=f"all {len(big_enough)} {gpu.name} node{'s' if len(big_enough) > 1 else ''} big enough for "
                f"{want} are busy; the Job waits for free GPUs (the cluster has: {cluster})",
    )
