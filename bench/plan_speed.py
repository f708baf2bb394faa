"""CPU time of one plan (`make_plan`) for the operator bench's four specs, and of the same plan served by the
plan cache (kubetune.planning.cache: a hit), side by side (not a test).

    .venv/bin/python bench/plan_speed.py --rounds 100
    # and the planner of another checkout (e.g. `git archive OLD | tar -x -C /tmp/old`), alternated with this one
    .venv/bin/python bench/plan_speed.py --rounds 100 --baseline /tmp/old --repeats 3

Each spec's architecture is resolved once (no I/O in the loop); the figure is process CPU time per plan, so
other processes on a shared machine inflate it less than wall time would.
"""

from __future__ import annotations

import argparse
import os
import subprocess
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


def uncached_in(checkout: Path, rounds: int) -> float:
    """make_plan's ms per plan in a fresh process importing `checkout`'s kubetune (its own bench script)."""
    env = {**os.environ, "PYTHONPATH": f"{checkout}{os.pathsep}{checkout / 'operator'}"}
    out = subprocess.run([sys.executable, str(checkout / "bench" / "plan_speed.py"), "--rounds", str(rounds)],
                         cwd=checkout, env=env, capture_output=True, text=True, check=True).stdout
    return float(out.split("make_plan (uncached)")[1].split()[0])


def versus(baseline: Path, rounds: int, repeats: int) -> None:
    """This checkout and `baseline` alternated, each run in its own process, `repeats` times."""
    here = Path(__file__).resolve().parents[1]
    for repeat in range(repeats):
        before, after = uncached_in(baseline, rounds), uncached_in(here, rounds)
        print(f"run {repeat + 1}: make_plan {before:.3f} ms ({baseline}) vs {after:.3f} ms (this checkout): "
              f"{after / before:.2f}x the CPU per plan, load average {os.getloadavg()[0]:.2f}")


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
    parser.add_argument("--baseline", type=Path, help="a checkout of an older commit: its planner, alternated")
    parser.add_argument("--repeats", type=int, default=3, help="alternations with --baseline")
    args = parser.parse_args()
    if args.baseline:
        versus(args.baseline.resolve(), args.rounds, args.repeats)
    else:
        main(args.rounds)
