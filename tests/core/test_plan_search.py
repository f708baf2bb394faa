"""The planner's knob search makes each memory estimate once per plan (kubetune.planning.knobs.KnobSearch): it must
answer exactly what a fresh search answers, whatever order the classes ask in."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

from kubetune.planning.knobs import KnobSearch, knob_order, training_shape
from kubetune.planning.models import CATALOG, Architecture
from kubetune.planning.ranks import job_estimate, per_rank
from kubetune.planning.vram import Estimate, GiB, TrainingShape, estimate
from kubetune.spec import FineTuneJobSpec, parse_spec
from kubetune.wire import Strategy

SHAPES: list[tuple[Strategy, int]] = [("single", 1), ("pipeline", 2), ("pipeline", 8), ("ddp", 1), ("ddp", 2),
                                      ("ddp", 8), ("fsdp", 4), ("fsdp", 64)]


def random_spec(rng: random.Random) -> FineTuneJobSpec:
    training: dict[str, Any] = {"maxSeqLength": rng.choice([256, 2048, 8192]),
                                "gradientAccumulationSteps": rng.choice([1, 6, 8, 32]),
                                "optimizer": rng.choice(["paged_adamw_32bit", "paged_adamw_8bit", "adamw_torch"])}
    if rng.random() < 0.3:
        training["microBatchSize"] = rng.choice([1, 2, 4])
    if rng.random() < 0.3:
        training["gradientCheckpointing"] = rng.choice([True, False])
    body: dict[str, Any] = {
        "model": {"name": "m"}, "method": rng.choice(["qlora", "lora"]), "training": training,
        "lora": {"r": rng.choice([8, 16, 64]), "dropout": rng.choice([0.0, 0.05]),
                 "targetModules": rng.choice(["all-linear", ["q_proj", "v_proj"], ["down_proj"]])},
        "dataset": {"source": "s3://datasets/x.jsonl"}, "output": {"uri": "s3://adapters/x/"}}
    if rng.random() < 0.3:
        body["evaluation"] = {"prompts": ["hi"], "maxNewTokens": 128}
    return parse_spec(body)


def fresh(spec: FineTuneJobSpec, arch: Architecture, usable: int, count: int,
          strategy: Strategy) -> tuple[TrainingShape, Estimate] | None:
    """The search as written before the memo: a new shape and estimate for every knob tried."""
    for mb, gc in knob_order(spec, count, strategy):
        shape = training_shape(spec, mb, gc, count)
        found = job_estimate(arch, shape, strategy)
        if found.total <= usable:
            return shape, found
    return None


def test_the_memoized_knob_search_answers_what_a_fresh_search_answers() -> None:
    rng = random.Random(20)
    archs = sorted(CATALOG.values(), key=lambda a: a.name)
    answered = set()
    for _ in range(60):
        spec, arch = random_spec(rng), rng.choice(archs)
        search = KnobSearch(spec, arch)  # one per plan: every query below shares its memo
        for _ in range(12):
            strategy, count = rng.choice(SHAPES)
            usable = int(rng.uniform(4, 140) * GiB)
            got = search.fastest(usable, count, strategy)
            assert got == fresh(spec, arch, usable, count, strategy), (arch.name, spec.training, strategy, count)
            answered.add(got is None)
    assert answered == {True, False}  # both fits and misses were asked


def test_a_rank_estimate_from_the_callers_one_gpu_estimate_is_the_same() -> None:
    arch = CATALOG["meta-llama/llama-3.1-70b"]
    shape = TrainingShape(micro_batch=2, seq_len=4096, gradient_checkpointing=True)
    one = estimate(arch, dataclasses.replace(shape, gpu_count=1))
    for strategy in ("ddp", "fsdp"):
        for ranks in (1, 2, 8):
            assert per_rank(arch, shape, strategy, ranks, one) == per_rank(arch, shape, strategy, ranks)
