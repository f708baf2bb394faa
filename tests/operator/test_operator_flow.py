"""The real kopf operator against kmock's emulator over HTTP: the path of a FineTuneJob."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from conftest import NS, Cluster, eventually, finetunejob  # noqa: E402


async def test_jobs_land_on_the_cheapest_class_that_fits(cluster: Cluster) -> None:
    await cluster.start_operator()
    await cluster.apply(finetunejob("small", "meta-llama/Llama-3.1-8B-Instruct"))
    status = await cluster.wait_phase("small", "Queued")
    assert status["gpu"] == "L4 x1"
    jobs = cluster.jobs()
    assert [j["metadata"]["name"] for j in jobs] == ["small-a1"]
