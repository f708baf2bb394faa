"""Per-rank memory of DDP and FSDP, and the step-time estimate, against published multi-GPU figures
(docs/vram_published_ranks.yaml), and the per-rank estimate's invariants. The planner's choice between shapes is
tested in test_plan_shapes.py."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.planning.gpus import load_catalog
from kubetune.planning.models import CATALOG
from kubetune.planning.ranks import active_params, per_rank, step_time
from kubetune.planning.vram import GiB, TrainingShape, estimate

ROOT = Path(__file__).resolve().parents[2]
PUBLISHED = yaml.safe_load((ROOT / "docs" / "vram_published_ranks.yaml").read_text())
ROWS = PUBLISHED["rows"]
HELD = [r for r in ROWS if r.get("band", True)]
GPUS = load_catalog()
LLAMA2_70B = CATALOG["meta-llama/llama-2-70b-hf"]


def published_shape(settings: dict[str, Any]) -> TrainingShape:
    return TrainingShape(method="qlora", micro_batch=settings["microBatch"], seq_len=settings["seq"],
                         gradient_checkpointing=settings["checkpointing"], lora_r=settings["r"],
                         lora_dropout=0.0, optimizer="adamw_torch", recipe="hf")


def row_id(row: dict[str, Any]) -> str:
    return f"{row['model'].split('/')[-1]}-{row['strategy']}{row['ranks']}-{row['settings']['microBatch']}x" \
           f"{row['settings']['seq']}"


@pytest.mark.parametrize("row", HELD, ids=[row_id(r) for r in HELD])
def test_per_rank_estimate_holds_to_published_figures(row: dict[str, Any]) -> None:
    arch = CATALOG[row["model"].lower()]
    got = per_rank(arch, published_shape(row["settings"]), row["strategy"], row["ranks"]).total / GiB
    ratio = got / row["figureGiB"]
    # Up to 1.35x: the estimate charges what the kubetune trainer holds (kubetune_trainer.fsdp: lm_head gathered
    # through the step, the 4-bit quantization constants whole on every rank, the input table on the GPU), which
    # Answer.AI's FSDP1 runs need not; on their smallest row (7B, batch 1) that is 1.32x.
    assert 0.95 <= ratio <= 1.35, f"{got:.2f} GiB vs published {row['figureGiB']} ({row['source']})"


def test_rows_not_held_say_why_and_are_what_the_estimate_does_not_model() -> None:
    """The 70B row ran with CPU offload (weights in host memory): the estimate keeps each shard on the GPU."""
    loose = [r for r in ROWS if not r.get("band", True)]
    assert loose and all(r["differs"].strip() for r in loose)
    for row in loose:
        arch = CATALOG[row["model"].lower()]
        got = per_rank(arch, published_shape(row["settings"]), row["strategy"], row["ranks"]).total / GiB
        assert got > 1.3 * row["figureGiB"]  # over, never under: not modelling offload errs on the safe side


def test_docs_table_lists_every_multi_gpu_row() -> None:
    text = (ROOT / "docs" / "vram.md").read_text()
    for row in ROWS:
        assert f"| {row['figureGiB']} |" in text, row["source"]


@pytest.mark.parametrize("fit", PUBLISHED["fits"], ids=[f"{f['gpus']}x-{f['card']}-b{f['microBatch']}"
                                                       for f in PUBLISHED["fits"]])
def test_shapes_published_as_training_70b_fit_their_cards_by_the_estimate(fit: dict[str, Any]) -> None:
    """Answer.AI trained Llama-2 70B QLoRA without offload on these shapes: the estimate must not refuse them."""
    shape = published_shape({"r": 64, "seq": 2048, "microBatch": fit["microBatch"], "checkpointing": True})
    got = per_rank(LLAMA2_70B, shape, "fsdp", fit["gpus"]).total / GiB
    assert got <= fit["cardGiB"], f"{fit['gpus']}x {fit['card']} at batch {fit['microBatch']}: {got:.1f} GiB"


# --- the step-time estimate against the same source's training times -------------------------------------

TIMES = {(t["gpu"], t["gpus"]): t for t in PUBLISHED["times"]}


def estimated_seconds(gpu: str, gpus: int) -> float:
    """Answer.AI's run: 1,024 samples of 2,048 tokens, an effective batch of 32 (32 optimizer steps)."""
    t = TIMES[gpu, gpus]
    shape = published_shape({"r": 64, "seq": 2048, "microBatch": t["microBatch"], "checkpointing": True})
    return 32 * step_time(LLAMA2_70B, shape, "fsdp", gpus, 1, 32 * 2048, gpu)


@pytest.mark.parametrize("key", list(TIMES), ids=[f"{g}x{n}" for g, n in TIMES])
def test_step_time_is_never_much_faster_than_published_and_at_most_half_again_slower(key: tuple[str, int]) -> None:
    ratio = estimated_seconds(*key) / TIMES[key]["seconds"]
    assert 0.9 <= ratio <= 1.5, f"{key}: {ratio:.2f}x the published time"


def test_step_time_scales_with_the_rank_count_as_published() -> None:
    """Same class and micro-batch, 4 -> 8 A100s: published 1266 s -> 672 s."""
    published = TIMES["A100-40GB", 8]["seconds"] / TIMES["A100-40GB", 4]["seconds"]
    assert estimated_seconds("A100-40GB", 8) / estimated_seconds("A100-40GB", 4) == pytest.approx(published,
                                                                                                   rel=0.10)


def test_h100_over_a100_speed_is_the_measured_one_not_the_data_sheets() -> None:
    published = TIMES["H100-80GB", 4]["seconds"] / TIMES["A100-40GB", 4]["seconds"]  # 0.53: 1.9x as fast
    assert estimated_seconds("H100-80GB", 4) / estimated_seconds("A100-40GB", 4) == pytest.approx(published,
                                                                                                  rel=0.05)


ARCH_70B = CATALOG["meta-llama/llama-3.1-70b"]
SHAPE = TrainingShape(method="qlora", micro_batch=1, seq_len=2048, gradient_checkpointing=True, lora_r=16)
TOKENS = 8 * 2048  # the spec's default effective batch: 8 sequences


def test_a_frozen_base_costs_4_flops_a_weight_and_token_6_with_recompute() -> None:
    one = step_time(ARCH_70B, replace(SHAPE, gradient_checkpointing=False), "single", 1, 1, TOKENS, "A100-80GB")
    again = step_time(ARCH_70B, SHAPE, "single", 1, 1, TOKENS, "A100-80GB")
    assert again / one == pytest.approx(6 / 4)
    assert one == pytest.approx(4 * ARCH_70B.total_params * TOKENS / (312e12 * 0.4))


def test_a_mixture_of_experts_computes_with_the_routed_experts_only() -> None:
    mixtral = CATALOG["mistralai/mixtral-8x7b-v0.1"]
    assert active_params(mixtral) < 0.3 * mixtral.total_params  # 2 of 8 experts: ~13B of ~47B
    assert active_params(ARCH_70B) == ARCH_70B.total_params


def test_ranks_beyond_the_micro_batches_idle_and_the_layer_split_is_no_faster_than_one_gpu() -> None:
    def t(strategy: str, gpus: int, nodes: int = 1) -> float:
        return step_time(ARCH_70B, SHAPE, strategy, gpus, nodes, TOKENS, "L4")

    one = t("single", 1)
    assert t("fsdp", 8) < t("fsdp", 4) < t("fsdp", 2) < one
    assert t("fsdp", 16, 2) > t("fsdp", 8)  # 8 micro-batches a step: 8 of 16 ranks idle, and the network is slower
    assert t("ddp", 8) == pytest.approx(one / 8, rel=0.01)  # DDP moves only the LoRA gradients
    assert one < t("pipeline", 4) < 1.01 * one  # one GPU works at a time, plus the hidden states between them


# --- per-rank invariants ------------------------------------------------------------------------------

def test_fsdp_shards_weights_and_states_ddp_copies_them() -> None:
    one = estimate(ARCH_70B, SHAPE)
    table = ARCH_70B.vocab * ARCH_70B.hidden * 2  # one GPU keeps the untied input table in host memory; ranks do not
    for ranks in (2, 4, 8):
        fsdp = per_rank(ARCH_70B, SHAPE, "fsdp", ranks)
        ddp = per_rank(ARCH_70B, SHAPE, "ddp", ranks)
        assert fsdp.parts["base_weights"] == pytest.approx((one.parts["base_weights"] + table) / ranks, rel=1e-6)
        assert fsdp.parts["optimizer_states"] == pytest.approx(one.parts["optimizer_states"] / ranks, rel=1e-6)
        assert fsdp.parts["quant_constants"] == one.parts["quant_constants"]  # not parameters: whole on every rank
        assert fsdp.parts["communication"] >= table  # lm_head, gathered through the step
        assert ddp.parts["base_weights"] == one.parts["base_weights"] + table
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
