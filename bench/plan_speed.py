"""CPU time of one plan (`make_plan`) for the operator bench's four specs, and of the same plan served by the
plan cache (kubetune.planning.cache: a hit), side by side (not a test).

    .venv/bin/python bench/plan_speed.py --rounds 100

Each spec's architecture is resolved once (no I/O in the loop); the figure is process CPU time per plan, so
other processes on a shared machine inflate it less than wall time would.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kubetune_operator.settings import Settings
from operator_scale import ftj

from kubetune.planning.cache import PlanCache
from kubetune.planning.gpus import load_catalog
from kubetune.planning.plan import make_plan
from kubetune.sources import model_architecture
from kubetune.spec import parse_spec


def per_plan_ms(plan: Callable[..., Any], pairs: list[tuple[Any, Any]], catalog: Any, rounds: int) -> float:
    for spec, arch in pairs:
        plan(spec, arch, catalog)  # warm (and, for the cache, fill it)
    started = time.process_time()
    for _ in range(rounds):
        for spec, arch in pairs:
            plan(spec, arch, catalog)
    return (time.process_time() - started) / rounds / len(pairs) * 1000


def main(rounds: int) -> None:
    settings = Settings()
    catalog = load_catalog(settings.gpu_catalog, settings.provisionable_gpu_classes)
    specs = [parse_spec(ftj(i)["spec"]) for i in range(4)]
    pairs = [(spec, model_architecture(spec.model.name, spec.model.source)) for spec in specs]
    uncached = per_plan_ms(make_plan, pairs, catalog, rounds)
    cache = PlanCache()
    cached = per_plan_ms(cache.plan, pairs, catalog, rounds)
    print(f"{'make_plan (uncached)':<24}{uncached:>9.3f} ms CPU per plan")
    print(f"{'PlanCache hit':<24}{cached:>9.3f} ms CPU per plan   {uncached / cached:.0f}x faster "
          f"({rounds} rounds of {len(pairs)} specs; cache {cache.hits} hits, {cache.misses} misses)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=100)
    main(parser.parse_args().rounds)
