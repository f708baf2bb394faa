"""The operator plans once per spec, architecture, OOM floor and supply, through one bounded cache that its
reconciles and its admission webhook share (kubetune.planning.cache); /metrics shows the cache's hits and misses."""

from __future__ import annotations

from kubetune_operator.main import build_operator
from kubetune_operator.metrics import Metrics
from kubetune_operator.settings import Settings
from kubetune_operator.webhook import review

from kubetune.planning.placement import Supply
from kubetune.spec import parse_spec

SPEC = {"model": {"name": "meta-llama/Llama-3.1-8B-Instruct"},
        "dataset": {"source": "s3://datasets/support/train.jsonl", "evalFraction": 0.1},
        "output": {"uri": "s3://adapters/support-bot/"}, "evaluation": {"prompts": ["a", "b"]}}


def test_reconciles_and_the_webhook_share_one_plan_cache_and_metrics_show_it() -> None:
    metrics = Metrics()
    _, memo = build_operator(Settings(), metrics)
    rt = memo.kubetune
    supply = Supply(nodes=(("A100-80GB", 8),))
    plan = rt.planner(supply)
    spec = parse_spec(SPEC)
    first = plan(spec, None)
    assert plan(spec, None) is first and (rt.plans.hits, rt.plans.misses) == (1, 1)
    assert plan(spec, "L4") is not first  # an OOM escalation's floor is its own plan
    edited = parse_spec({**SPEC, "evaluation": {"prompts": ["a", "b"], "maxNewTokens": 512}})
    assert plan(edited, None).eval_seconds > first.eval_seconds  # an edited evaluation is planned anew
    assert (rt.plans.hits, rt.plans.misses) == (1, 3)

    assert review(SPEC, rt.catalog, rt.plans) == [] and review(SPEC, rt.catalog, rt.plans) == []
    assert (rt.plans.hits, rt.plans.misses) == (2, 4)  # admission plans against the whole catalog: once
    text = metrics.exposition().decode()
    assert "kubetune_plan_cache_hits_total 2.0" in text and "kubetune_plan_cache_misses_total 4.0" in text
