"""CPU time of the operator's decision for a new FineTuneJob, per job, for bench/operator_scale.py's burst (not a
test): `reconcile()` (plan from the warm plan cache, placement, the ConfigMap and trainer Job, the status and its
Event), with nothing sent.

    .venv/bin/python bench/reconcile_speed.py --jobs 2000 --repeats 3

Set beside the operator's CPU per job in that burst (`CPU during the burst` in operator_scale.py), it says how
much of the operator's time is its own decision; the rest is kopf, aiohttp and asyncio carrying the watch events
and the requests. The figure is process CPU time, so other processes on a shared machine inflate it little.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kubetune_operator import status as st
from kubetune_operator.cache import Cache
from kubetune_operator.reconcile import Snapshot, reconcile
from kubetune_operator.settings import Settings
from operator_scale import cluster_nodes, ftj

from kubetune.planning.cache import PlanCache
from kubetune.planning.gpus import load_catalog
from kubetune.planning.models import Architecture
from kubetune.planning.placement import supply_of
from kubetune.planning.plan import Plan
from kubetune.sources import model_architecture
from kubetune.spec import FineTuneJobSpec


def snapshots(jobs: int) -> list[Snapshot]:
    """One Snapshot per new FineTuneJob of the burst, read as the operator reads them (its cache of the bench's
    nodes, its plan cache, one architecture per model)."""
    settings = Settings()
    catalog = load_catalog(settings.gpu_catalog, settings.provisionable_gpu_classes)
    cache = Cache()
    for node in cluster_nodes():
        cache.node(False, node["metadata"]["name"], node)
    inventory = cache.inventory()
    supply, plans = supply_of(inventory, catalog), PlanCache()
    archs: dict[str | None, Architecture] = {}

    def planner(spec: FineTuneJobSpec, above: str | None) -> Plan:
        if spec.model.name not in archs:
            archs[spec.model.name] = model_architecture(spec.model.name, None)
        arch = archs[spec.model.name]
        return plans.plan(spec, arch, catalog, above=above, supply=supply)

    result = []
    for index in range(jobs):
        body = ftj(index)
        body["metadata"].update(uid=f"uid-{index:05d}", generation=1)
        result.append(Snapshot(body=body, status={}, trainer_job=None, pods=(),
                               outcome=st.observe(None, (), settings.trainer_port), inventory=inventory,
                               catalog=catalog, settings=settings, planner=planner, now=st.now_iso()))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    snaps = snapshots(args.jobs)
    for snap in snaps[:8]:
        assert reconcile(snap).create, "a new job's decision creates its children"  # and warms the plan cache
    for repeat in range(args.repeats):
        started = time.process_time()
        for snap in snaps:
            reconcile(snap)
        took = time.process_time() - started
        print(f"reconcile() of a new job, run {repeat + 1}: {took / args.jobs * 1000:.3f} ms of CPU per job "
              f"({args.jobs} jobs, {took:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
