"""The operator's one periodic task (handlers.resync_once) leaves a job whose reconcile is running to that
reconcile: in a burst hundreds are in flight at each wake-up, and reconciling each again after it is CPU the
burst does not have. It visits only unsettled jobs (Cache.unsettled): a cluster's finished history is not walked every
interval."""

from __future__ import annotations

import asyncio
from typing import Any

from kubetune_operator.cache import Cache
from kubetune_operator.handlers import Runtime, resync_once
from kubetune_operator.metrics import Metrics
from kubetune_operator.settings import Settings

from kubetune.planning.gpus import load_catalog


async def test_a_job_being_reconciled_is_left_to_that_reconcile() -> None:
    rt = Runtime(Settings(), Metrics(), load_catalog(None, ()))
    body = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": "a", "namespace": "ns", "uid": "uid-a", "generation": 1}, "spec": {}, "status": {}}
    rt.cache.finetunejob(False, ("ns", "a"), body)  # undecided: due at every wake-up
    async with rt.locks.setdefault("uid-a", asyncio.Lock()):  # an event's reconcile holds it
        assert await asyncio.wait_for(resync_once(rt, 0), 5) == 0  # not waiting for that lock
    # free again: the resync reconciles it (which fails here, with no API client: logged, retried next time)
    assert await resync_once(rt, 0) == 1
    assert rt.metrics.reconciles.labels("resync", "error")._value.get() == 1


def ftj(name: str, namespace: str, phase: str | None, generation: int = 1, observed: int = 1,
        gpus: int = 1) -> dict[str, Any]:
    status = {} if phase is None else {"phase": phase, "observedGeneration": observed, "plan": {"gpuCount": gpus}}
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{namespace}-{name}",
                         "generation": generation}, "spec": {}, "status": status}


def test_the_unsettled_index_follows_each_job_through_its_life() -> None:
    cache = Cache()
    cache.finetunejob(False, ("a", "one"), ftj("one", "a", None))
    cache.finetunejob(False, ("a", "two"), ftj("two", "a", "Running"))
    cache.finetunejob(False, ("b", "three"), ftj("three", "b", "Succeeded"))  # settled: history
    assert set(cache.unsettled) == {("a", "one"), ("a", "two")}
    cache.finetunejob(False, ("a", "two"), ftj("two", "a", "Succeeded"))  # finished
    assert set(cache.unsettled) == {("a", "one")}
    cache.finetunejob(False, ("b", "three"), ftj("three", "b", "Succeeded", generation=2))  # its spec changed
    assert set(cache.unsettled) == {("a", "one"), ("b", "three")}
    cache.finetunejob(True, ("a", "one"), ftj("one", "a", None))  # deleted
    cache.finetunejob(True, ("b", "three"), ftj("three", "b", "Succeeded", generation=2))
    assert cache.unsettled == {}
    assert set(cache.finetunejobs) == {("a", "two")}  # every job stays in the main store until deleted
