"""Planning once: make_plan's results, remembered by everything it reads (issue 20).

The key is the spec's canonical JSON (make_plan and its callees read model, method, lora, training, resources,
dataset, evaluation and output: keying on the whole spec cannot go stale when a callee starts reading another
field) less its addresses (ADDRESSES: where the data is read from and the adapter written to, and the credentials
for them; the planner does no I/O and reads none of them, only whether a separate eval file is set), so that a
sweep of one model over many datasets plans once; then the model's architecture, the GPU catalog (by value),
the class an OOM escalation plans above, and the cluster's supply (the inventory's version: the GPU classes it has
nodes of or can provision, by value).
Bounded (least recently used out first) and safe to share between threads: the API plans in a thread pool
(kubetune.api.limits.Offload) and the operator's admission webhook in kopf's executor. A plan that fails
(PlanError) is not remembered. Callers get the shared Plan: treat it as read-only (model_copy to change it).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable

from kubetune.planning.gpus import GpuCatalog
from kubetune.planning.models import Architecture
from kubetune.planning.placement import Supply
from kubetune.planning.plan import Plan, make_plan
from kubetune.spec import FineTuneJobSpec

DEFAULT_SIZE = 1024  # plans held at most (a plan is a few KiB)
# Where data comes from and goes, never what it is: the same plan for any value (tests/core/test_plan_cache.py)
ADDRESSES = {"dataset": {"source", "eval_source"}, "output": {"uri", "credentials_secret", "endpoint_url"}}


def plan_key(spec: FineTuneJobSpec, arch: Architecture, catalog: GpuCatalog, above: str | None,
             supply: Supply | None) -> tuple[Hashable, ...]:
    """Everything make_plan reads, hashable and equal exactly when the inputs are equal (the addresses aside:
    of those the planner reads only whether dataset.evalSource is set)."""
    return (spec.model_dump_json(exclude=ADDRESSES), spec.dataset.eval_source is not None, arch, repr(catalog),
            above, supply)


class PlanCache:
    """make_plan, remembered: `plan()` takes make_plan's arguments. `hits` and `misses` count lookups."""

    def __init__(self, size: int = DEFAULT_SIZE) -> None:
        if size < 1:
            raise ValueError(f"plan cache size: must be at least 1, got {size}")
        self.size = size
        self.hits = 0
        self.misses = 0
        self._plans: OrderedDict[tuple[Hashable, ...], Plan] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._plans)

    def __bool__(self) -> bool:  # an empty cache is still a cache (`plans or PlanCache()` would drop it)
        return True

    def plan(self, spec: FineTuneJobSpec, arch: Architecture, catalog: GpuCatalog, above: str | None = None,
             supply: Supply | None = None) -> Plan:
        key = plan_key(spec, arch, catalog, above, supply)
        with self._lock:
            found = self._plans.get(key)
            if found is not None:
                self._plans.move_to_end(key)
                self.hits += 1
                return found
            self.misses += 1
        made = make_plan(spec, arch, catalog, above=above, supply=supply)  # outside the lock: others may plan
        with self._lock:
            self._plans[key] = made
            self._plans.move_to_end(key)
            while len(self._plans) > self.size:
                self._plans.popitem(last=False)
        return made
