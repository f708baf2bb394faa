"""What the trainer's memory work buys, through `kubetune plan` (issue 13): the jobs peers fit on a 24 GB card
are planned onto one, and the small QLoRA jobs are planned small."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from kubetune.planning.vram import GiB


def plan_json(run_plan: Callable[..., tuple[int, str, str]], job: dict[str, Any], model: str, method: str,
              **training: Any) -> dict[str, Any]:
    job["spec"]["model"] = {"name": model}
    job["spec"]["method"] = method
    job["spec"]["training"].update({"maxSeqLength": 2048, "microBatchSize": 1, **training})
    code, out, err = run_plan(job, "-o", "json")
    assert code == 0, err
    result: dict[str, Any] = json.loads(out)
    return result


def test_8b_16_bit_lora_at_2048_tokens_fits_a_24_gb_class(run_plan: Callable[..., tuple[int, str, str]],
                                                          job: dict[str, Any]) -> None:
    plan = plan_json(run_plan, job, "meta-llama/Llama-3.1-8B-Instruct", "lora")
    assert plan["gpuClass"] in ("L4", "A10G")
    assert plan["gpuCount"] == 1


def test_8b_qlora_at_2048_tokens_with_checkpointing_is_planned_at_8_gib_or_less(
        run_plan: Callable[..., tuple[int, str, str]], job: dict[str, Any]) -> None:
    plan = plan_json(run_plan, job, "meta-llama/Llama-3.1-8B-Instruct", "qlora", gradientCheckpointing=True)
    assert plan["knobs"]["gradientCheckpointing"] is True
    assert plan["vramEstimateBytes"] <= 8 * GiB, plan["breakdown"]


@pytest.mark.parametrize("checkpointing", [True, "auto"])
def test_1b_qlora_at_2048_tokens_is_planned_at_4_gib_or_less(run_plan: Callable[..., tuple[int, str, str]],
                                                             job: dict[str, Any], checkpointing: bool | str) -> None:
    plan = plan_json(run_plan, job, "meta-llama/Llama-3.2-1B-Instruct", "qlora",
                     gradientCheckpointing=checkpointing)
    lean = next(r for r in plan["reasons"] if "leanest" in r)
    assert float(lean.split(" needs ")[1].split(" GiB")[0]) <= 4.0, lean
    if checkpointing is True:
        assert plan["vramEstimateBytes"] <= 4 * GiB, plan["breakdown"]
