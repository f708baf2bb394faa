"""GPU classes the planner chooses from: memory, bf16, relative price, and the node labels that find them.

The built-in catalog lives in `kubetune/data/gpus.yaml`. A platform team replaces or extends it
without code changes: `KUBETUNE_GPU_CATALOG=/path/gpus.yaml` (the Helm chart mounts `values.gpuCatalog`
there). Entries with the name of a built-in class replace it; new names add classes.

A class is `provisionable` when the platform scales its node pool up from zero (Karpenter, cluster-autoscaler,
GKE node auto-provisioning): the planner may choose it although no node of it exists yet. Set it per class in
the catalog (`provisionable: true`) or list the classes in `KUBETUNE_PROVISIONABLE_GPU_CLASSES` (Helm:
`operator.provisionableGpuClasses`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from kubetune.errors import SpecError

GPU_RESOURCE = "nvidia.com/gpu"
ENV_CATALOG = "KUBETUNE_GPU_CATALOG"
ENV_PROVISIONABLE = "KUBETUNE_PROVISIONABLE_GPU_CLASSES"


@dataclass(frozen=True)
class GpuClass:
    name: str
    memory_bytes: int
    bf16: bool
    hourly_price: float  # relative; only ratios matter
    # Any one of these label sets identifies a node of this class (GFD, EKS, GKE, AKS).
    node_labels: tuple[dict[str, str], ...] = field(default_factory=tuple)
    max_per_node: int = 8
    provisionable: bool = False  # node pools of it scale up from zero (the planner may pick it with no node)

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / 1024**3

    def matches(self, labels: dict[str, str]) -> bool:
        return any(all(labels.get(k) == v for k, v in want.items()) for want in self.node_labels)


@dataclass(frozen=True)
class GpuCatalog:
    classes: tuple[GpuClass, ...]
    headroom: float = 0.08  # fraction of card memory the planner leaves unused

    def get(self, name: str, field_path: str) -> GpuClass:
        for gpu in self.classes:
            if gpu.name.lower() == name.lower():
                return gpu
        raise SpecError(f"{field_path}: unknown GPU class {name!r}; allowed: auto, {', '.join(self.names)}")

    @property
    def names(self) -> list[str]:
        return [g.name for g in self.classes]

    def by_price(self) -> list[GpuClass]:
        return sorted(self.classes, key=lambda g: (g.hourly_price, g.memory_bytes))

    def usable_bytes(self, gpu: GpuClass) -> int:
        return int(gpu.memory_bytes * (1 - self.headroom))

    def class_of_node(self, labels: dict[str, str]) -> GpuClass | None:
        return next((g for g in self.classes if g.matches(labels)), None)


def _flag(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    raise SpecError(f"{where}: must be true or false, got {value!r}")


def _parse(raw: dict[str, Any], origin: str) -> tuple[list[GpuClass], float | None]:
    if not isinstance(raw, dict) or not isinstance(raw.get("classes"), list):
        raise SpecError(f"{origin}: must be a mapping with a 'classes' list")
    classes = []
    for index, item in enumerate(raw["classes"]):
        where = f"{origin}: classes[{index}]"
        try:
            classes.append(
                GpuClass(
                    name=str(item["name"]),
                    memory_bytes=int(float(item["memoryGiB"]) * 1024**3),
                    bf16=bool(item.get("bf16", True)),
                    hourly_price=float(item["hourlyPrice"]),
                    node_labels=tuple(dict(labels) for labels in item.get("nodeLabels", [])),
                    max_per_node=int(item.get("maxPerNode", 8)),
                    provisionable=_flag(item.get("provisionable", False), f"{where}.provisionable"),
                )
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SpecError(f"{where}: needs name, memoryGiB, hourlyPrice (and nodeLabels); problem: {exc}") from None
    headroom = raw.get("headroom")
    return classes, float(headroom) if headroom is not None else None


def load_catalog(override: Path | None = None, provisionable: tuple[str, ...] | None = None) -> GpuCatalog:
    """The built-in catalog, merged with `override` (or $KUBETUNE_GPU_CATALOG); the classes named in
    `provisionable` (or $KUBETUNE_PROVISIONABLE_GPU_CLASSES, comma-separated) are marked provisionable."""
    builtin = yaml.safe_load(resources.files("kubetune").joinpath("data/gpus.yaml").read_text())
    classes, headroom = _parse(builtin, "built-in catalog")
    path = override or (Path(os.environ[ENV_CATALOG]) if os.environ.get(ENV_CATALOG) else None)
    if path is not None:
        extra, extra_headroom = _parse(yaml.safe_load(path.read_text()) or {}, str(path))
        by_name = {g.name: g for g in classes}
        by_name.update({g.name: g for g in extra})
        classes = list(by_name.values())
        headroom = extra_headroom if extra_headroom is not None else headroom
    catalog = GpuCatalog(tuple(classes), headroom if headroom is not None else 0.08)
    if provisionable is None:
        provisionable = tuple(n for n in os.environ.get(ENV_PROVISIONABLE, "").replace(",", " ").split() if n)
    if provisionable:
        names = {catalog.get(name, ENV_PROVISIONABLE).name for name in provisionable}
        catalog = GpuCatalog(tuple(replace(g, provisionable=True) if g.name in names else g for g in classes),
                             catalog.headroom)
    return catalog


@cache
def default_catalog() -> GpuCatalog:
    return load_catalog()
