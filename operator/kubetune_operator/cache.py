"""The cluster as the operator's watches see it: GPU nodes, the GPUs pods hold, trainer Jobs, JobSets and pods,
and the FineTuneJobs, each slimmed to what a decision reads (slim.py). Filled by the `kopf.on.event` handlers
(handlers.py); read by every reconcile, so placement and following cost no request.

Why not kopf's indexes: during an operator's (re)start, kopf makes every object of every watched kind wait
until each object of an indexed kind is indexed, and each indexed object wakes every waiter
(`aiotoggles.ToggleSet.drop_toggle` -> `Condition.notify_all`): O(N^2) wake-ups for N objects. With 2,000
resident FineTuneJobs (6,000 objects with their Jobs and pods) the relist took minutes of CPU
(docs/benchmarks.md). Plain event handlers do not wait; the one thing that barrier gave, "everything listed
before the first decision", is `listed` here: the resync task (handlers.py) sets it once the initial listing
has gone quiet, and no decision is taken before.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kubetune import wire
from kubetune.planning.placement import Inventory, NodeInfo, node_info, pod_gpus
from kubetune_operator import resources, scaleout, slim, trust

JOBSET_NAME = "jobset.sigs.k8s.io/jobset-name"  # the JobSet controller's label on its Jobs and pods
JOB_NAME = "batch.kubernetes.io/job-name"  # the Job controller's label on its pods
QUIET_SECONDS = 0.5  # the initial listing is over when no listed object arrived for this long
FIRST_WITHIN = 5.0  # seconds to wait for the listing's first object (a GPU node, at least, in any real cluster)
Key = tuple[str | None, str]  # (namespace, name)


def pod_workload(labels: Mapping[str, str]) -> str:
    """The workload a trainer pod says it belongs to (its JobSet, else its Job); trust checks owners later."""
    workload = labels.get(JOBSET_NAME) or labels.get(JOB_NAME)
    if not workload:
        attempt = int(labels.get(resources.LABEL_ATTEMPT, "0") or 0)
        workload = resources.child_name(labels.get(resources.LABEL_JOB, ""), attempt)
    return workload


@dataclass
class Cache:
    nodes: dict[str, NodeInfo] = field(default_factory=dict)  # GPU nodes by name
    gpus_held: dict[str, tuple[str, int]] = field(default_factory=dict)  # pod uid -> (node, GPUs it holds)
    pods: dict[Key, dict[str, dict[str, Any]]] = field(default_factory=dict)  # (ns, workload) -> uid -> trainer pod
    jobs: dict[Key, dict[str, Any]] = field(default_factory=dict)  # trainer Jobs
    jobsets: dict[Key, dict[str, Any]] = field(default_factory=dict)  # trainer JobSets
    finetunejobs: dict[Key, dict[str, Any]] = field(default_factory=dict)  # by (ns, job_label(name))
    # the same FineTuneJobs less the settled ones (slim.settled, by their watched status): what the resync visits,
    # without walking a cluster's finished history every interval
    unsettled: dict[Key, dict[str, Any]] = field(default_factory=dict)
    listed: bool = False  # the initial listing is in (see settle)
    last_listed: float = field(default_factory=time.monotonic)  # when the last object of a listing arrived
    listed_count: int = 0

    def saw(self, event: Mapping[str, Any]) -> None:
        """Note an event: one of the initial listing (kopf gives those type None) pushes `settle` back."""
        if event.get("type") is None:
            self.last_listed, self.listed_count = time.monotonic(), self.listed_count + 1

    async def settle(self, quiet: float = QUIET_SECONDS, first_within: float = FIRST_WITHIN) -> None:
        """Wait for the initial listing to start (its first object, or `first_within` seconds: a cluster with
        nothing to list) and to go quiet (no listed object for `quiet` seconds, twice in a row); then mark the
        cache listed."""
        started = time.monotonic()
        while self.listed_count == 0 and time.monotonic() - started < first_within:
            await asyncio.sleep(quiet / 4)
        calm = 0
        while calm < 2:
            count = self.listed_count
            await asyncio.sleep(quiet / 2)
            calm = calm + 1 if count == self.listed_count and time.monotonic() - self.last_listed >= quiet / 2 else 0
        self.listed = True

    def node(self, deleted: bool, name: str, body: Mapping[str, Any]) -> None:
        info = None if deleted else node_info(body)
        if info is not None and info.allocatable_gpus > 0:
            self.nodes[name] = info
        else:
            self.nodes.pop(name, None)

    def pod(self, deleted: bool, uid: str, namespace: str | None, labels: Mapping[str, str],
            body: Mapping[str, Any]) -> None:
        node, gpus = (None, 0) if deleted else pod_gpus(body)
        if node and gpus:
            self.gpus_held[uid] = (node, gpus)
        else:
            self.gpus_held.pop(uid, None)
        if labels.get(wire.MANAGED_BY_LABEL) != wire.MANAGED_BY:
            return  # not a trainer pod
        key = (namespace, pod_workload(labels))
        if deleted:
            self.pods.get(key, {}).pop(uid, None)
            if not self.pods.get(key, True):
                del self.pods[key]
        else:
            self.pods.setdefault(key, {})[uid] = slim.pod(body)

    def put(self, store: dict[Key, dict[str, Any]], deleted: bool, key: Key, value: dict[str, Any]) -> None:
        if deleted:
            store.pop(key, None)
        else:
            store[key] = value

    def finetunejob(self, deleted: bool, key: Key, value: dict[str, Any]) -> None:
        """A FineTuneJob event: the job under its key, and among the unsettled jobs while it is one. A job settled
        by the operator's own write but not yet by the watch stays until the watch catches up; a settled job whose
        spec changes (a new generation) is unsettled again."""
        self.put(self.finetunejobs, deleted, key, value)
        settled = slim.settled(value["status"], value["metadata"].get("generation"))
        self.put(self.unsettled, deleted or settled, key, value)

    def inventory(self) -> Inventory:
        held: dict[str, int] = {}
        for node, gpus in self.gpus_held.values():
            held[node] = held.get(node, 0) + gpus
        return Inventory(tuple(self.nodes.values()), held)

    def workload(self, namespace: str | None, name: str, owner_uid: str | None
                 ) -> tuple[Mapping[str, Any] | None, tuple[Mapping[str, Any], ...]]:
        """The attempt's Job or JobSet, if this FineTuneJob controls it, and the pods it controls (a JobSet's
        through its child Jobs, which the jobs cache holds too: they carry the trainer labels)."""
        found = self.jobs.get((namespace, name)) or self.jobsets.get((namespace, name))
        trainer = trust.trusted_job(found, owner_uid)
        pods = list(self.pods.get((namespace, name), {}).values())
        if trainer is not None and trainer.get("kind") == "JobSet":
            jobs = [self.jobs.get((namespace, job)) for job in scaleout.jobset_job_names(trainer)]
            return trainer, trust.trusted_jobset_pods(trainer, [j for j in jobs if j is not None], pods)
        return trainer, trust.trusted_pods(trainer, pods)
