"""kubetune.quota: the one quota decision (API and operator), as a table, and the quotas file's messages."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import pytest

from kubetune.errors import SpecError
from kubetune.quota import Ask, Holdings, Limits, QuotaFile, Quotas, Usage, decide, parse_quotas, usage_of

L4x1 = Ask("L4", 1, 2.5)
ALL = Limits(max_concurrent_jobs=2, max_gpus=4, allowed_gpu_classes=("L4", "A10G"), max_estimated_cost=10)

DECISIONS = [  # (limits, usage, ask, the limit refused (None: allowed), status)
    (None, Usage(99, 99), L4x1, None, None),
    (Limits(), Usage(99, 99), L4x1, None, None),
    (ALL, Usage(1, 3), L4x1, None, None),  # exactly at every limit after it
    (ALL, Usage(0, 0), Ask("l4", 1, 1.0), None, None),  # class names as the catalog matches them
    (ALL, Usage(0, 0), Ask("A100-80GB", 1, 1.0), "allowedGpuClasses", 403),
    (ALL, Usage(0, 0), Ask("L4", 1, 10.01), "maxEstimatedCost", 403),
    (ALL, Usage(2, 0), L4x1, "maxConcurrentJobs", 429),
    (ALL, Usage(1, 4), L4x1, "maxGpus", 429),
    (ALL, Usage(0, 0), Ask("L4", 5, 1.0), "maxGpus", 429),
    (ALL, Usage(2, 4), Ask("H100-80GB", 8, 99.0), "allowedGpuClasses", 403),  # what waiting cannot fix comes first
    (Limits(max_concurrent_jobs=0), Usage(0, 0), L4x1, "maxConcurrentJobs", 429),
]


@pytest.mark.parametrize(("limits", "usage", "ask", "limit", "status"), DECISIONS)
def test_decide(limits: Limits | None, usage: Usage, ask: Ask, limit: str | None, status: int | None) -> None:
    refusal = decide(limits, usage, ask)
    assert (refusal.limit, refusal.status) == (limit, status) if refusal else limit is None
    if refusal:
        assert refusal.message.startswith(f"quota {limit} is ")


def test_usage_counts_queued_and_running_jobs_and_their_plans_gpus() -> None:
    def job(uid: str, phase: str | None, gpus: int = 1) -> dict[str, object]:
        status = {"phase": phase, "plan": {"gpuClass": "L4", "gpuCount": gpus}} if phase else {}
        return {"metadata": {"uid": uid}, "status": status}

    jobs = [job("a", "Queued", 2), job("b", "Running", 4), job("c", "Pending"), job("d", "Suspended"),
            job("e", "Succeeded", 8), job("f", "Failed"), job("g", None), job("h", "Running", 1)]
    assert usage_of(jobs) == Usage(3, 7)
    assert usage_of(jobs, exclude_uid="b") == Usage(2, 3)
    assert usage_of(jobs, statuses={"c": {"phase": "Queued", "plan": {"gpuCount": 1}}}) == Usage(4, 8)


def test_holdings_kept_event_by_event_equal_the_sum_over_the_jobs() -> None:
    """The operator keeps usage as statuses change (Holdings) instead of summing a namespace's jobs per decision;
    after every change of a random life of 40 jobs in 3 namespaces it equals usage_of over their last statuses,
    with and without a job left out."""
    rng = random.Random(20)
    phases = [None, "Pending", "Queued", "Running", "Succeeded", "Failed", "Suspended"]
    held, last = Holdings(), {}  # last: (namespace, uid) -> status, as the jobs stand
    for _ in range(2000):
        namespace, uid = rng.choice(["a", "b", "c"]), f"uid-{rng.randrange(40)}"
        key = next((k for k in last if k[1] == uid), (namespace, uid))  # a job keeps its namespace
        if rng.random() < 0.1:
            held.set(key[0], uid, None)
            last.pop(key, None)
            continue
        status: dict[str, Any] = {"phase": rng.choice(phases)}
        if rng.random() < 0.8:
            status["plan"] = {"gpuCount": rng.randrange(0, 9)}
        held.set(key[0], uid, status)
        last[key] = status
        for ns in ("a", "b", "c"):
            jobs = [{"metadata": {"uid": u}, "status": st} for (n, u), st in last.items() if n == ns]
            assert held.usage(ns) == usage_of(jobs)
            assert held.usage(ns, uid) == usage_of(jobs, exclude_uid=uid)
    for namespace, uid in list(last):
        held.set(namespace, uid, None)
    assert held.jobs == {} and held.totals == {}


def test_namespaces_inherit_the_default_key_by_key() -> None:
    quotas = parse_quotas({"default": {"maxConcurrentJobs": 4, "maxGpus": 8},
                           "namespaces": {"team-a": {"maxGpus": 2}, "team-b": {}}})
    assert quotas.for_namespace("team-a") == Limits(max_concurrent_jobs=4, max_gpus=2)
    assert quotas.for_namespace("team-b") == Limits(max_concurrent_jobs=4, max_gpus=8)
    assert quotas.for_namespace("other") == Limits(max_concurrent_jobs=4, max_gpus=8)
    assert parse_quotas({"namespaces": {"a": {"maxGpus": 1}}}).for_namespace("b") is None
    assert parse_quotas(None) == Quotas()


@pytest.mark.parametrize(("raw", "message"), [
    ({"namespaces": {"team-a": {"maxGPUs": 2}}},
     "quotas.namespaces.team-a.maxGPUs: unknown quota; allowed: maxConcurrentJobs, maxGpus, allowedGpuClasses, "
     "maxEstimatedCost"),
    ({"default": {"maxGpus": -1}}, "quotas.default.maxGpus: must be an integer >= 0, got -1"),
    ({"default": {"maxConcurrentJobs": "2"}}, "quotas.default.maxConcurrentJobs: must be an integer >= 0, got '2'"),
    ({"default": {"maxEstimatedCost": True}}, "quotas.default.maxEstimatedCost: must be a number >= 0, got True"),
    ({"default": {"allowedGpuClasses": "L4"}}, "quotas.default.allowedGpuClasses: must be a list of GPU class "
                                               "names, got 'L4'"),
    ({"namespaces": ["team-a"]}, "quotas.namespaces: must be a mapping of namespace -> limits"),
    ({"teams": {}}, "quotas: must be a mapping with 'default' and/or 'namespaces'"),
])
def test_a_bad_quotas_file_names_the_key(raw: object, message: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_quotas(raw)
    assert caught.value.problems == [message]


def test_the_file_is_read_again_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "quotas.yaml"
    path.write_text("default: {maxGpus: 1}\n")
    quotas = QuotaFile(str(path))
    assert quotas.get().for_namespace("x") == Limits(max_gpus=1)
    path.write_text("default: {maxGpus: 12}\n")
    os.utime(path, (1, 1))
    assert quotas.get().for_namespace("x") == Limits(max_gpus=12)
    assert QuotaFile(None).get() == Quotas()
