"""The plan cache (kubetune.planning.cache): a spec differing in anything make_plan reads gets its own plan, never a
stale one; the bound holds (least recently used out first); the hit and miss counters move and reach Prometheus."""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from kubetune.planning.cache import PlanCache
from kubetune.planning.cache_metrics import PlanCacheCollector
from kubetune.planning.gpus import GpuCatalog, load_catalog
from kubetune.planning.models import Architecture
from kubetune.planning.placement import Supply
from kubetune.planning.plan import Plan, make_plan
from kubetune.sources import model_architecture
from kubetune.spec import FineTuneJobSpec, parse_spec

LLAMA_8B = "meta-llama/Llama-3.1-8B-Instruct"
CATALOG = load_catalog(provisionable=())
ARCH = model_architecture(LLAMA_8B, None)


def raw(**changes: dict[str, Any]) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model": {"name": LLAMA_8B}, "method": "qlora",
        "dataset": {"source": "s3://data/train.jsonl", "evalFraction": 0.1},
        "training": {"maxSteps": 500}, "output": {"uri": "s3://out/x/"},
        "evaluation": {"prompts": ["a", "b"], "maxNewTokens": 64},
    }
    for section, fields in changes.items():
        base[section] = {**base[section], **fields} if isinstance(base.get(section), dict) else fields
    return base


BASE = parse_spec(raw())

# One change to each part of the spec make_plan (or a callee) reads; each changes the plan.
SPEC_CHANGES: dict[str, dict[str, Any]] = {
    "dataset.evalFraction": {"dataset": {"evalFraction": 0.3}},  # held-out tokens: the evaluation's time
    "evaluation.maxNewTokens": {"evaluation": {"maxNewTokens": 512}},
    "evaluation.compareBase": {"evaluation": {"compareBase": False}},
    "evaluation.prompts": {"evaluation": {"prompts": ["a"] * 8}},
    "training.maxSteps": {"training": {"maxSteps": 900}},
    "training.maxSeqLength": {"training": {"maxSteps": 500, "maxSeqLength": 8192}},
    "lora.r": {"lora": {"r": 128}},
    "method": {"method": "lora"},
    "resources.gpuClass": {"resources": {"gpuClass": "A100-80GB"}},
}


def differs(a: Plan, b: Plan) -> bool:
    return a.model_dump() != b.model_dump()


@pytest.mark.parametrize("field", list(SPEC_CHANGES))
def test_a_spec_differing_in_a_field_the_planner_reads_gets_its_own_plan(field: str) -> None:
    cache = PlanCache()
    base = cache.plan(BASE, ARCH, CATALOG)
    changed = parse_spec(raw(**SPEC_CHANGES[field]))
    fresh = make_plan(changed, ARCH, CATALOG)
    assert differs(fresh, base), f"{field}: the change must change the plan for this test to mean anything"
    assert cache.plan(changed, ARCH, CATALOG).model_dump() == fresh.model_dump()
    assert (cache.hits, cache.misses) == (0, 2)


def test_a_separate_eval_file_gets_its_own_plan() -> None:
    """Of the addresses the planner reads one thing: whether dataset.evalSource is set (held-out tokens)."""
    cache = PlanCache()
    base = cache.plan(BASE, ARCH, CATALOG)
    changed = parse_spec(raw(dataset={"evalSource": "s3://data/eval.jsonl"}))
    fresh = make_plan(changed, ARCH, CATALOG)
    assert differs(fresh, base)
    assert cache.plan(changed, ARCH, CATALOG).model_dump() == fresh.model_dump() and cache.misses == 2


# Addresses only (where the data is and where the adapter goes): one plan for all of them, the plan a sweep's
# jobs share (bench/operator_scale.py's burst: one model, a dataset and an output prefix per job).
ADDRESS_CHANGES: dict[str, dict[str, Any]] = {
    "dataset.source": {"dataset": {"source": "s3://other/train-2.jsonl"}},
    "dataset.evalSource": {"dataset": {"evalSource": "s3://data/eval-2.jsonl"}},
    "output.uri": {"output": {"uri": "s3://elsewhere/run-7/"}},
    "output.credentialsSecret": {"output": {"uri": "s3://out/x/", "credentialsSecret": "team-b-s3"}},
    "output.endpointUrl": {"output": {"uri": "s3://out/x/", "endpointUrl": "http://minio.local:9000"}},
}


@pytest.mark.parametrize("field", list(ADDRESS_CHANGES))
def test_specs_differing_only_in_addresses_share_one_plan(field: str) -> None:
    with_eval = "evalSource" in field
    first = parse_spec(raw(dataset={"evalSource": "s3://data/eval.jsonl"}) if with_eval else raw())
    changed = parse_spec(raw(**ADDRESS_CHANGES[field]))
    assert make_plan(changed, ARCH, CATALOG).model_dump() == make_plan(first, ARCH, CATALOG).model_dump(), \
        f"{field}: the planner reads it; it is not an address (take it out of cache.ADDRESSES)"
    cache = PlanCache()
    cache.plan(first, ARCH, CATALOG)
    cache.plan(changed, ARCH, CATALOG)
    assert (cache.hits, cache.misses) == (1, 1)


def bigger(arch: Architecture) -> Architecture:
    return replace(arch, layers=arch.layers * 2)


def roomier(catalog: GpuCatalog) -> GpuCatalog:
    return replace(catalog, headroom=0.5)


# The inputs besides the spec: the architecture, the catalog, the class an OOM escalation plans above, the supply.
OTHER_CHANGES: dict[str, dict[str, Any]] = {
    "architecture": {"arch": bigger(ARCH)},
    "catalog": {"catalog": roomier(CATALOG)},
    "above (OOM escalation)": {"above": "L4"},
    "supply (inventory)": {"supply": Supply(nodes=(("A100-80GB", 8),))},
}


@pytest.mark.parametrize("what", list(OTHER_CHANGES))
def test_a_change_to_the_architecture_catalog_escalation_or_supply_gets_its_own_plan(what: str) -> None:
    cache = PlanCache()
    args: dict[str, Any] = {"arch": ARCH, "catalog": CATALOG, "above": None, "supply": None}
    base = cache.plan(BASE, **args)
    args.update(OTHER_CHANGES[what])
    fresh = make_plan(BASE, **args)
    assert differs(fresh, base), f"{what}: the change must change the plan for this test to mean anything"
    assert cache.plan(BASE, **args).model_dump() == fresh.model_dump()
    assert cache.misses == 2


def specs(n: int) -> list[FineTuneJobSpec]:
    return [parse_spec(raw(training={"maxSteps": 100 + i})) for i in range(n)]


def test_the_bound_holds_and_the_least_recently_used_plan_goes_first() -> None:
    a, b, c = specs(3)
    cache = PlanCache(size=2)
    cache.plan(a, ARCH, CATALOG)
    cache.plan(b, ARCH, CATALOG)
    cache.plan(a, ARCH, CATALOG)  # a is now the most recently used
    cache.plan(c, ARCH, CATALOG)  # b goes
    assert len(cache) == 2 and (cache.hits, cache.misses) == (1, 3)
    cache.plan(a, ARCH, CATALOG)
    assert (cache.hits, cache.misses) == (2, 3)
    cache.plan(b, ARCH, CATALOG)
    assert (cache.hits, cache.misses) == (2, 4) and len(cache) == 2
    with pytest.raises(ValueError, match="plan cache size: must be at least 1, got 0"):
        PlanCache(size=0)


def test_hits_and_misses_reach_prometheus() -> None:
    cache = PlanCache()
    registry = CollectorRegistry()
    registry.register(PlanCacheCollector(cache))
    for _ in range(3):
        cache.plan(BASE, ARCH, CATALOG)
    text = generate_latest(registry).decode()
    assert "kubetune_plan_cache_hits_total 2.0" in text
    assert "kubetune_plan_cache_misses_total 1.0" in text
    assert "kubetune_plan_cache_entries 1.0" in text


def test_threads_share_one_cache_within_its_bound() -> None:
    cache, some = PlanCache(size=3), specs(4)
    plans: list[Plan] = []
    lock = threading.Lock()

    def work() -> None:
        for spec in some * 2:
            made = cache.plan(spec, ARCH, CATALOG)
            with lock:
                plans.append(made)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(plans) == 32 and cache.hits + cache.misses == 32 and len(cache) == 3
    assert {p.steps for p in plans} == {100, 101, 102, 103}
