"""Per-namespace quotas a platform sets, and the one decision both the API and the operator make with them.

The platform writes them in the chart's values (`quotas:`), rendered into a ConfigMap that the API and the
operator mount and read (`KUBETUNE_QUOTAS`, re-read when the file changes):

    default:                      # every namespace without an entry of its own
      maxConcurrentJobs: 4
    namespaces:
      team-a:                     # merged over `default`, key by key
        maxConcurrentJobs: 2      # FineTuneJobs Queued or Running at once
        maxGpus: 4                # GPUs those jobs' plans hold, together
        allowedGpuClasses: [L4, A10G]
        maxEstimatedCost: 20      # per job: the plan's estimated cost (catalog hourlyPrice x hours)

`decide(limits, usage, ask)` is pure: None (allowed) or a Refusal naming the limit. A class that is not
allowed or a cost over the limit cannot change by waiting (403); jobs or GPUs in use can (429). The API
refuses at submit; the operator keeps a job that `kubectl apply` brought Pending (reason QuotaExceeded,
a Warning Event) and decides again every poll interval.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from kubetune.contracts import Phase
from kubetune.errors import SpecError

ACTIVE_PHASES = (Phase.QUEUED.value, Phase.RUNNING.value)  # what counts against maxConcurrentJobs and maxGpus
ENV_QUOTAS = "KUBETUNE_QUOTAS"
log = logging.getLogger("kubetune.quota")
_KEYS = {"maxConcurrentJobs": "max_concurrent_jobs", "maxGpus": "max_gpus",
         "allowedGpuClasses": "allowed_gpu_classes", "maxEstimatedCost": "max_estimated_cost"}


@dataclass(frozen=True)
class Limits:
    max_concurrent_jobs: int | None = None
    max_gpus: int | None = None
    allowed_gpu_classes: tuple[str, ...] | None = None
    max_estimated_cost: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {key: (list(v) if isinstance(v := getattr(self, attr), tuple) else v) for key, attr in _KEYS.items()}


@dataclass(frozen=True)
class Usage:
    jobs: int = 0  # FineTuneJobs Queued or Running
    gpus: int = 0  # the GPUs their plans hold

    def to_json(self) -> dict[str, int]:
        return {"concurrentJobs": self.jobs, "gpus": self.gpus}


@dataclass(frozen=True)
class Ask:
    """What one job's plan asks for."""

    gpu_class: str
    gpus: int
    estimated_cost: float


@dataclass(frozen=True)
class Refusal:
    limit: str  # the quota key: allowedGpuClasses, maxEstimatedCost, maxConcurrentJobs, maxGpus
    status: int  # 403: the job can never fit this quota; 429: it can once others finish
    message: str


def decide(limits: Limits | None, usage: Usage, ask: Ask) -> Refusal | None:
    """None when `ask` fits; otherwise the first limit it breaks (classes, cost, then jobs, GPUs)."""
    if limits is None:
        return None
    allowed = limits.allowed_gpu_classes
    if allowed is not None and ask.gpu_class.lower() not in {c.lower() for c in allowed}:
        return Refusal("allowedGpuClasses", 403, f"quota allowedGpuClasses is [{', '.join(allowed)}]; the plan "
                       f"needs {ask.gpu_class} (set spec.resources.maxGpuClass or a smaller model or method)")
    if limits.max_estimated_cost is not None and ask.estimated_cost > limits.max_estimated_cost:
        return Refusal("maxEstimatedCost", 403, f"quota maxEstimatedCost is {limits.max_estimated_cost:g}; the "
                       f"plan's estimated cost is {ask.estimated_cost:.2f} (lower training.maxSteps or epochs)")
    if limits.max_concurrent_jobs is not None and usage.jobs + 1 > limits.max_concurrent_jobs:
        return Refusal("maxConcurrentJobs", 429, f"quota maxConcurrentJobs is {limits.max_concurrent_jobs}; "
                       f"{usage.jobs} FineTuneJobs are already queued or running")
    if limits.max_gpus is not None and usage.gpus + ask.gpus > limits.max_gpus:
        return Refusal("maxGpus", 429, f"quota maxGpus is {limits.max_gpus}; {usage.gpus} GPUs are in use and "
                       f"this job's plan needs {ask.gpus} more")
    return None


def holding(status: Mapping[str, Any]) -> Usage:
    """What one job with this status holds: itself and its plan's GPUs while Queued or Running, else nothing."""
    if status.get("phase") not in ACTIVE_PHASES:
        return Usage()
    plan = status.get("plan")
    return Usage(1, int(plan.get("gpuCount") or 0) if isinstance(plan, Mapping) else 0)


def usage_of(jobs: Iterable[Mapping[str, Any]], exclude_uid: str | None = None,
             statuses: Mapping[str, Mapping[str, Any]] | None = None) -> Usage:
    """Jobs Queued or Running and their plans' GPUs; `statuses` (uid -> status) overrides what `jobs` carry
    (the operator's own writes, which its watch has not delivered yet)."""
    count = gpus = 0
    for job in jobs:
        uid = str((job.get("metadata") or {}).get("uid") or "")
        if exclude_uid and uid == exclude_uid:
            continue
        held = holding((statuses or {}).get(uid) or job.get("status") or {})
        count, gpus = count + held.jobs, gpus + held.gpus
    return Usage(count, gpus)


@dataclass
class Holdings:
    """What each namespace's jobs hold, kept as their statuses change (the operator's watch and its own writes),
    so that a decision reads its namespace's usage at once. Summing the namespace's jobs on every decision made
    a burst into one namespace quadratic: 22.6 ms of operator CPU per job for 2,000 jobs beside 10,000 resident
    (docs/benchmarks.md, issue 20)."""

    jobs: dict[str, dict[str, Usage]] = field(default_factory=dict)  # namespace -> uid -> what it holds (not 0)
    totals: dict[str, Usage] = field(default_factory=dict)  # namespace -> the sum of those

    def set(self, namespace: str, uid: str, status: Mapping[str, Any] | None) -> None:
        """A job's latest status; None: it is gone."""
        now = holding(status) if status is not None else Usage()
        held = self.jobs.setdefault(namespace, {})
        before = held.pop(uid, Usage())
        if now != Usage():
            held[uid] = now
        if not held:
            del self.jobs[namespace]
        total = self.totals.pop(namespace, Usage())
        total = Usage(total.jobs - before.jobs + now.jobs, total.gpus - before.gpus + now.gpus)
        if total != Usage():
            self.totals[namespace] = total

    def usage(self, namespace: str, exclude_uid: str | None = None) -> Usage:
        """What the namespace's jobs hold, less `exclude_uid`'s own (a job does not count against itself)."""
        total = self.totals.get(namespace, Usage())
        mine = self.jobs.get(namespace, {}).get(exclude_uid or "", Usage())
        return Usage(total.jobs - mine.jobs, total.gpus - mine.gpus)


# --- the quotas file (the mounted ConfigMap) -----------------------------------------------------------------

@dataclass(frozen=True)
class Quotas:
    default: Limits | None = None
    namespaces: Mapping[str, Limits] = field(default_factory=dict)

    def for_namespace(self, namespace: str) -> Limits | None:
        return self.namespaces.get(namespace, self.default)


def _limits(raw: Any, where: str, base: Limits | None) -> Limits:
    if not isinstance(raw, Mapping):
        raise SpecError(f"{where}: must be a mapping of {', '.join(_KEYS)}")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in _KEYS:
            raise SpecError(f"{where}.{key}: unknown quota; allowed: {', '.join(_KEYS)}")
        if key == "allowedGpuClasses":
            if not isinstance(value, list) or not all(isinstance(c, str) and c for c in value):
                raise SpecError(f"{where}.{key}: must be a list of GPU class names, got {value!r}")
            values[_KEYS[key]] = tuple(value)
        elif key == "maxEstimatedCost":
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise SpecError(f"{where}.{key}: must be a number >= 0, got {value!r}")
            values[_KEYS[key]] = float(value)
        else:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise SpecError(f"{where}.{key}: must be an integer >= 0, got {value!r}")
            values[_KEYS[key]] = value
    return replace(base or Limits(), **values)


def parse_quotas(raw: Any, origin: str = "quotas") -> Quotas:
    """The quotas document; a SpecError names the key (`quotas.namespaces.team-a.maxGpus: ...`)."""
    if raw is None:
        return Quotas()
    if not isinstance(raw, Mapping) or set(raw) - {"default", "namespaces"}:
        raise SpecError(f"{origin}: must be a mapping with 'default' and/or 'namespaces'")
    default = _limits(raw["default"], f"{origin}.default", None) if raw.get("default") is not None else None
    namespaces = raw.get("namespaces") or {}
    if not isinstance(namespaces, Mapping):
        raise SpecError(f"{origin}.namespaces: must be a mapping of namespace -> limits")
    return Quotas(default, {str(ns): _limits(v, f"{origin}.namespaces.{ns}", default) for ns, v in namespaces.items()})


class QuotaFile:
    """The mounted quotas file, parsed again whenever it changes (a ConfigMap update needs no restart); a file that
    does not parse is logged and the last good quotas stay in force (none, if it never parsed)."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._stamp: tuple[float, int] | None = None
        self._quotas = Quotas()
        self.error: str | None = None  # why the file's current content is not in force (the last good one is)

    @classmethod
    def from_env(cls) -> QuotaFile:
        return cls(os.environ.get(ENV_QUOTAS) or None)

    def get(self) -> Quotas:
        if self.path is None:
            return self._quotas
        try:
            stat = Path(self.path).stat()
            if self._stamp != (stat.st_mtime, stat.st_size):
                self._stamp = (stat.st_mtime, stat.st_size)
                self._quotas, self.error = parse_quotas(yaml.safe_load(Path(self.path).read_text()), self.path), None
        except (OSError, yaml.YAMLError, SpecError) as exc:
            self.error = "; ".join(exc.problems) if isinstance(exc, SpecError) else f"{self.path}: {exc}"
            log.error(f"quotas not reloaded, the last good ones stay in force: {self.error}")
        return self._quotas

