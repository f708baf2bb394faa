"""The counters a reconcile asks for reach the metric of their own name (handlers.apply -> Metrics.count)."""

from __future__ import annotations

from typing import get_args

import pytest
from kubetune_operator.metrics import Metrics
from kubetune_operator.reconcile import Counter
from prometheus_client import Counter as PromCounter


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_each_counter_name_is_a_counter_of_the_operator() -> None:
    metrics = Metrics()
    assert all(isinstance(getattr(metrics, name, None), PromCounter) for name in get_args(Counter))


def test_every_counter_counts_under_its_own_name() -> None:
    metrics = Metrics()
    metrics.count([("placement_failures", ("L4",)), ("oom_escalations", ("L4", "A10G")), ("jobs_created", ())])
    assert sample(metrics, "kubetune_operator_placement_failures_total", gpu_class="L4") == 1
    assert sample(metrics, "kubetune_operator_oom_escalations_total", from_class="L4", to_class="A10G") == 1
    assert sample(metrics, "kubetune_operator_trainer_jobs_created_total") == 1


def test_a_name_that_is_not_a_counter_is_refused() -> None:
    with pytest.raises(ValueError, match="'registry' is not one of the operator's counters"):
        Metrics().count([("registry", ())])
