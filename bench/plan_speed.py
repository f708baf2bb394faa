"""CPU time of one plan (`make_plan`) for the operator bench's four specs (not a test).

    .venv/bin/python bench/plan_speed.py --rounds 100

Each spec's architecture is resolved once (no I/O in the loop); the figure is process CPU time per plan, so
other processes on a shared machine inflate it less than wall time would.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kubetune_operator.settings import Settings
from operator_scale import ftj

from kubetune.planning.gpus import load_catalog
from kubetune.planning.plan import make_plan
from kubetune.sources import model_architecture
from kubetune.spec import parse_spec


def main(rounds: int) -> None:
    settings = Settings()
    catalog = load_catalog(settings.gpu_catalog, settings.provisionable_gpu_classes)
    specs = [parse_spec(ftj(i)["spec"]) for i in range(4)]
    pairs = [(spec, model_architecture(spec.model.name, spec.model.source)) for spec in specs]
    for spec, arch in pairs:
        make_plan(spec, arch, catalog)
    started = time.process_time()
    for _ in range(rounds):
        for spec, arch in pairs:
            make_plan(spec, arch, catalog)
    print(f"{(time.process_time() - started) / rounds / len(pairs) * 1000:.2f} ms CPU per plan "
          f"({rounds} rounds of {len(pairs)} specs)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=100)
    main(parser.parse_args().rounds)
