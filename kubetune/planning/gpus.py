"""GPU classes the planner chooses from: memory, bf16, relative price, and the node labels that find them.

The built-in catalog lives in `kubetune/data/gpus.yaml`. A platform team replaces or extends it
without code changes: `KUBETUNE_GPU_CATALOG=/path/gpus.yaml` (the Helm chart mounts `values.gpuCatalog`
there). Entries with the name of a built-in class replace it; new names add classes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from kubetune.errors import SpecError

GPU_RESOURCE = "nvidia.com/gpu"
ENV_CATALOG = "KUBETUNE_GPU_CATALOG"


@dataclass(frozen=True)
class GpuClass:
    name: str
    memory_bytes: int
    bf16: bool
    hourly_price: float  # relative; only ratios matter
    # Any one of these label sets identifies a node of this class (GFD, EKS, GKE, AKS).
    node_labels: tuple[dict[str, str], ...] = field(default_factory=tuple)
    max_per_node: int = 8

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / 1024**3

    def node_selector(self) -> dict[str, str]:
        """The label set used as the pod's nodeSelector hint (the first: GPU Feature Discovery)."""
        return dict(self.node_labels[0]) if self.node_labels else {}

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
                )
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SpecError(f"{where}: needs name, memoryGiB, hourlyPrice (and nodeLabels); problem: {exc}") from None
    headroom = raw.get("headroom")
    return classes, float(headroom) if headroom is not None else None


def load_catalog(override: Path | None = None) -> GpuCatalog:
    builtin = yaml.safe_load(resources.files("kubetune").joinpath("data/gpus.yaml").read_text())
    classes, headroom = _parse(builtin, "built-in catalog")
    path = override or (Path(os.environ[ENV_CATALOG]) if os.environ.get(ENV_CATALOG) else None)
    if path is not None:
        extra, extra_headroom = _parse(yaml.safe_load(path.read_text()) or {}, str(path))
        by_name = {g.name: g for g in classes}
        by_name.update({g.name: g for g in extra})
        classes = list(by_name.values())
        headroom = extra_headroom if extra_headroom is not None else headroom
    return GpuCatalog(tuple(classes), headroom if headroom is not None else 0.08)


@cache
def default_catalog() -> GpuCatalog:
    return load_catalog()
