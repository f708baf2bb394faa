"""The operator's one periodic task (handlers.resync_once) leaves a job whose reconcile is running to that
reconcile: in a burst hundreds are in flight at each wake-up, and reconciling each again after it is CPU the
burst does not have."""

from __future__ import annotations

import asyncio

from kubetune_operator.handlers import Runtime, resync_once
from kubetune_operator.metrics import Metrics
from kubetune_operator.settings import Settings

from kubetune.planning.gpus import load_catalog


async def test_a_job_being_reconciled_is_left_to_that_reconcile() -> None:
    rt = Runtime(Settings(), Metrics(), load_catalog(None, ()))
    body = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": "a", "namespace": "ns", "uid": "uid-a", "generation": 1}, "spec": {}, "status": {}}
    rt.cache.finetunejobs[("ns", "a")] = body  # undecided: due at every wake-up
    async with rt.locks.setdefault("uid-a", asyncio.Lock()):  # an event's reconcile holds it
        assert await asyncio.wait_for(resync_once(rt, 0), 5) == 0  # not waiting for that lock
    # free again: the resync reconciles it (which fails here, with no API client: logged, retried next time)
    assert await resync_once(rt, 0) == 1
    assert rt.metrics.reconciles.labels("resync", "error")._value.get() == 1
