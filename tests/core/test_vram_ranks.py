"""Per-rank memory of DDP and FSDP against published multi-GPU figures (docs/vram_published_ranks.yaml), its
invariants, and the comparison of shapes (one big GPU against several small ones) by cost and time."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.planning.gpus import load_catalog
from kubetune.planning.models import CATALOG
from kubetune.planning.ranks import choose, options, per_rank
from kubetune.planning.vram import GiB, TrainingShape, estimate

ROOT = Path(__file__).resolve().parents[2]
ROWS = yaml.safe_load((ROOT / "docs" / "vram_published_ranks.yaml").read_text())["rows"]
GPUS = load_catalog()
CLASSES = [(g.name, GPUS.usable_bytes(g), g.hourly_price, g.max_per_node) for g in GPUS.classes]


def published_shape(settings: dict[str, Any]) -> TrainingShape:
    return TrainingShape(method="qlora", micro_batch=settings["microBatch"], seq_len=settings["seq"],
                         gradient_checkpointing=settings["checkpointing"], lora_r=settings["r"],
                         lora_dropout=0.0, optimizer="adamw_torch", recipe="hf")


@pytest.mark.parametrize("row", ROWS, ids=[f"{r['strategy']}-{r['settings']['microBatch']}x{r['settings']['seq']}"
                                            for r in ROWS])
def test_per_rank_estimate_holds_to_published_figures(row: dict[str, Any]) -> None:
    arch = CATALOG[row["model"].lower()]
    got = per_rank(arch, published_shape(row["settings"]), row["strategy"], row["ranks"]).total / GiB
    ratio = got / row["figureGiB"]
    assert 0.95 <= ratio <= 1.30, f"{got:.2f} GiB vs published {row['figureGiB']} ({row['source']})"


def test_docs_table_lists_every_multi_gpu_row() -> None:
    text = (ROOT / "docs" / "vram.md").read_text()
    for row in ROWS:
        assert f"| {row['figureGiB']} |" in text, row["source"]


ARCH_70B = CATALOG["meta-llama/llama-3.1-70b"]
SHAPE = TrainingShape(method="qlora", micro_batch=1, seq_len=2048, gradient_checkpointing=True, lora_r=16)


def test_fsdp_shards_weights_and_states_ddp_copies_them() -> None:
    one = estimate(ARCH_70B, SHAPE)
    for ranks in (2, 4, 8):
        fsdp = per_rank(ARCH_70B, SHAPE, "fsdp", ranks)
        ddp = per_rank(ARCH_70B, SHAPE, "ddp", ranks)
        assert fsdp.parts["base_weights"] == pytest.approx(one.parts["base_weights"] / ranks, rel=1e-6)
        assert fsdp.parts["optimizer_states"] == pytest.approx(one.parts["optimizer_states"] / ranks, rel=1e-6)
        assert ddp.parts["base_weights"] == one.parts["base_weights"]
        assert fsdp.parts["activations"] == ddp.parts["activations"] == one.parts["activations"]  # per rank
        assert fsdp.parts["communication"] > 0 and ddp.total > one.total
    totals = [per_rank(ARCH_70B, SHAPE, "fsdp", n).total for n in (2, 4, 8)]
    assert totals == sorted(totals, reverse=True)


def test_70b_qlora_fits_several_24gb_gpus_only_sharded() -> None:
    a10g = GPUS.usable_bytes(GPUS.get("A10G", "x"))
    assert estimate(ARCH_70B, SHAPE).total > a10g
    assert per_rank(ARCH_70B, SHAPE, "ddp", 4).total > a10g
    assert per_rank(ARCH_70B, SHAPE, "fsdp", 2).total > a10g  # 2 x 24 GB: 27 GiB per rank with comms
    assert per_rank(ARCH_70B, SHAPE, "fsdp", 4).total < a10g


def test_shapes_are_compared_by_price_times_time_and_the_reasons_say_so() -> None:
    found = options(ARCH_70B, SHAPE, 16 * 2048, CLASSES, max_gpus=8)
    best, reasons = choose(found)
    assert best is not None and best.fits
    assert all(best.relative_cost <= o.relative_cost for o in found if o.fits)
    assert reasons[0].startswith(best.label()) and "cheapest shape that fits" in reasons[0]
    small = [o for o in found if o.gpu_class in ("A10G", "L4") and o.fits]
    assert small and all(o.strategy == "fsdp" and o.gpus >= 4 for o in small)  # only sharded, 4 or more


def test_a_small_model_stays_on_one_gpu() -> None:
    arch = CATALOG["meta-llama/llama-3.1-8b"]
    best, _ = choose(options(arch, SHAPE, 16 * 2048, CLASSES, max_gpus=8))
    assert best is not None and best.strategy == "single" and best.gpus == 1


def test_multi_node_shapes_use_the_network() -> None:
    capped = [(name, usable, price, 4) for name, usable, price, _ in CLASSES]
    found = options(ARCH_70B, SHAPE, 16 * 2048, capped, max_gpus=8)
    eight = next(o for o in found if o.gpu_class == "A10G" and o.gpus == 8 and o.strategy == "fsdp")
    assert (eight.nodes, eight.gpus_per_node) == (2, 4)
    one_node = next(o for o in options(ARCH_70B, SHAPE, 16 * 2048, CLASSES, max_gpus=8)
                    if o.gpu_class == "A10G" and o.gpus == 8 and o.strategy == "fsdp")
    assert eight.relative_time > one_node.relative_time


def test_no_shape_fits_says_what_each_needs() -> None:
    huge = replace(SHAPE, micro_batch=64, seq_len=8192, gradient_checkpointing=False)
    best, reasons = choose(options(CATALOG["meta-llama/llama-3.1-405b"], huge, 64 * 8192, CLASSES[:2], max_gpus=2))
    assert best is None and "no shape fits" in reasons[0] and "GiB per GPU" in reasons[0]


# --- the planner with resources.strategy and maxGpuCount ------------------------------------------------

def plan_for(model: str, **resources: Any) -> Any:
    from kubetune.planning.models import resolve_architecture
    from kubetune.planning.plan import make_plan
    from kubetune.spec import parse_spec

    spec = parse_spec({"model": {"name": model}, "dataset": {"source": "s3://datasets/train.jsonl"},
                       "output": {"uri": "s3://adapters/x/"}, "resources": resources})
    return make_plan(spec, resolve_architecture(spec.model.name, None), GPUS)


def test_fsdp_plans_70b_on_small_gpus_when_the_big_ones_are_ruled_out() -> None:
    plan = plan_for("meta-llama/Llama-3.1-70B", strategy="fsdp", maxGpuClass="A10G")
    assert (plan.gpu_class, plan.gpu_count, plan.strategy) == ("L4", 4, "fsdp")
    assert plan.vram_estimate_bytes <= plan.usable_bytes_per_gpu and plan.breakdown["communication"] > 0
    assert any("strategy fsdp: weights, gradients and optimizer states sharded over 4 ranks" in r
               for r in plan.reasons)
    assert any(r.startswith("8x L4 also holds it but costs") for r in plan.reasons)


def test_the_count_cap_is_honoured_and_a_pinned_count_above_it_is_refused() -> None:
    from kubetune.errors import PlanError

    with pytest.raises(PlanError, match="cannot hold this job"):
        plan_for("meta-llama/Llama-3.1-70B", strategy="fsdp", gpuClass="L4", maxGpuCount=2)
    with pytest.raises(PlanError, match=r"spec\.resources\.gpuCount: 4 is above spec\.resources\.maxGpuCount 2"):
        plan_for("meta-llama/Llama-3.1-70B", strategy="fsdp", gpuCount=4, maxGpuCount=2)


def test_auto_strategy_keeps_the_one_node_layer_split_and_ddp_costs_its_copies() -> None:
    auto = plan_for("meta-llama/Llama-3.1-70B", gpuClass="A10G")
    assert auto.strategy == "pipeline" and auto.gpu_count <= 8
    ddp = plan_for("meta-llama/Llama-3.1-8B", strategy="ddp", gpuClass="L4", gpuCount=4)
    one = plan_for("meta-llama/Llama-3.1-8B", gpuClass="L4", gpuCount=1)
    assert ddp.strategy == "ddp" and ddp.breakdown["base_weights"] == one.breakdown["base_weights"]
