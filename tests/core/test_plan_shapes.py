"""The planner's choice of shape (issue 12): one bigger GPU against several smaller ones with FSDP or DDP, against
the layer split, by estimated cost per job; the reasons that tell it; the count cap; and multi-node shapes against
a cluster's nodes, counted per node."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from kubetune.errors import PlanError, SpecError
from kubetune.planning.gpus import GpuCatalog, default_catalog
from kubetune.planning.models import catalog_lookup
from kubetune.planning.placement import Inventory, NodeInfo, Supply, node_split, place, supply_of
from kubetune.planning.plan import Plan, make_plan
from kubetune.spec import parse_spec

L70 = "meta-llama/Llama-3.1-70B-Instruct"
L8 = "meta-llama/Llama-3.1-8B-Instruct"
L4_LABELS = {"nvidia.com/gpu.product": "NVIDIA-L4"}


def plan(model: str, supply: Supply | None = None, catalog: GpuCatalog | None = None, **spec: Any) -> Plan:
    body = {"model": {"name": model}, "dataset": {"source": "s3://datasets/x.jsonl"},
            "output": {"uri": "s3://adapters/x/"}, **spec}
    return make_plan(parse_spec(body), catalog_lookup(model), catalog or default_catalog(), supply=supply)


# --- the whole catalog: what wins, and why -------------------------------------------------------------------

@pytest.mark.parametrize(("model", "spec", "shape", "why"), [
    # 70B QLoRA fits no 24 GB GPU; 4 L4s with FSDP cost less per job than one A100-80GB (and per hour: 3.20 vs 3.43)
    (L70, {}, "4x L4 FSDP", "cheaper per job than one 80 GB GPU"),
    (L70, {"resources": {"maxGpuCount": 1}}, "1x A100-80GB", "one GPU: the cheapest class that holds it"),
    (L70, {"resources": {"maxGpuCount": 2}}, "2x A100-40GB FSDP", "2 L4s cannot hold it; 2 A100-40GB can"),
    (L70, {"resources": {"maxGpuClass": "A100-40GB"}}, "4x L4 FSDP", "shards instead of going bigger"),
    (L70, {"resources": {"gpuClass": "L4"}}, "4x L4 FSDP", "pinned class: FSDP, not the layer split"),
    (L70, {"resources": {"strategy": "ddp"}}, "2x A100-80GB DDP", "DDP keeps a full copy per GPU"),
    (L70, {"training": {"maxSeqLength": 4096}, "resources": {"gpuClass": "L4"}}, "8x L4 FSDP",
     "4 L4s cannot hold 4096 tokens"),
    ("meta-llama/Llama-3.1-405B", {}, "8x A100-80GB FSDP", "nothing holds 405B on one GPU"),
    ("Qwen/Qwen2.5-32B-Instruct", {}, "2x L4 FSDP", "24 GiB on one GPU: 2 L4s beat an A100-40GB"),
    ("mistralai/Mixtral-8x7B-v0.1", {}, "4x L4 FSDP", "FSDP gathers every expert, and each rank keeps the whole "
                                                      "quantization constants: 2 L4s cannot hold it"),
    # a job that fits one cheap GPU stays on it: more GPUs of a class cost more per job (they add communication)
    (L8, {}, "1x L4", "fits one L4"),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", {}, "1x L4", "fits one L4"),
    (L8, {"resources": {"strategy": "ddp"}}, "2x L4 DDP", "asked for DDP: the cheapest DDP shape"),
    (L8, {"resources": {"strategy": "ddp", "gpuCount": 4}}, "4x L4 DDP", "asked for DDP on 4 GPUs"),
    (L8, {"resources": {"strategy": "fsdp"}}, "2x L4 FSDP", "asked for FSDP"),
    (L8, {"resources": {"gpuCount": 4}}, "4x L4 DDP", "4 GPUs pinned: DDP costs least on 4"),
    (L8, {"resources": {"strategy": "ddp", "maxGpuCount": 1}}, "1x L4", "the cap leaves one GPU"),
    (L8, {"method": "lora", "training": {"maxSeqLength": 6144}, "resources": {"strategy": "ddp"}},
     "2x A100-40GB DDP", "20.6 GiB fits one L4, its DDP copy (21.1 GiB) does not: a dearer class, as asked"),
    # the layer split stays where it is the only shape that holds the job: each DDP/FSDP rank keeps a whole
    # micro-batch's activations, the layer split divides them
    (L8, {"training": {"maxSeqLength": 32768}, "resources": {"gpuClass": "L4"}}, "2x L4 layer split",
     "32k tokens: no rank holds a whole sequence's activations"),
    (L70, {"training": {"maxSeqLength": 4096}, "resources": {"gpuClass": "L4", "maxGpuCount": 4}},
     "4x L4 layer split", "4 FSDP ranks cannot hold 4096 tokens, 8 are over the cap"),
])
def test_the_shape_the_planner_chooses(model: str, spec: dict[str, Any], shape: str, why: str) -> None:
    p = plan(model, **spec)
    assert p.label() == shape, (why, p.reasons)
    assert p.vram_estimate_bytes <= p.usable_bytes_per_gpu
    cap = spec.get("resources", {}).get("maxGpuCount")
    assert cap is None or p.gpu_count <= cap
    requested = spec.get("resources", {}).get("strategy", "auto")
    assert requested == "auto" or p.strategy in (requested, "single")


@pytest.mark.parametrize(("model", "spec"), [
    (L70, {}), (L8, {}), ("Qwen/Qwen2.5-32B-Instruct", {}), ("meta-llama/Llama-3.1-405B", {}),
    (L8, {"resources": {"strategy": "ddp"}}), (L70, {"resources": {"maxGpuCount": 2}}),
    (L8, {"training": {"maxSteps": 300}}),
])
def test_the_chosen_shape_costs_least_per_job_of_the_candidates(model: str, spec: dict[str, Any]) -> None:
    p = plan(model, **spec)
    candidates = [a for a in p.alternatives if not a.note]  # notes mark shapes that were not candidates
    assert candidates and all(a.job_cost_ratio >= 1 for a in candidates)
    assert p.estimated_cost == pytest.approx(p.hourly_cost * p.step_seconds * p.steps / 3600)
    assert p.steps == spec.get("training", {}).get("maxSteps", 1000)


def test_scaling_out_buys_cheaper_gpu_hours_never_dearer_ones() -> None:
    """The baseline is the cheapest class that holds the job on one GPU; no candidate is dearer per GPU-hour."""
    catalog = default_catalog()
    for model in (L8, L70, "Qwen/Qwen2.5-32B-Instruct"):
        p = plan(model)
        one = plan(model, resources={"maxGpuCount": 1})
        assert catalog.get(p.gpu_class, "x").hourly_price <= one.hourly_cost
        assert all(catalog.get(a.gpu_class, "x").hourly_price <= one.hourly_cost
                   for a in p.alternatives if not a.note)
        dearer = [a for a in p.alternatives if a.note.startswith("not a candidate: dearer per GPU-hour")]
        assert all(catalog.get(a.gpu_class, "x").hourly_price > one.hourly_cost for a in dearer)


def test_the_reasons_tell_which_shape_won_by_how_much_and_why_not_fewer() -> None:
    p = plan(L70)
    text = "\n".join(p.reasons)
    assert p.reasons[0].startswith("meta-llama/Llama-3.1-70B QLORA") and "46.7 GiB on one GPU" in p.reasons[0]
    assert "20.6 GiB per GPU as 4x L4 FSDP" in p.reasons[0]
    chosen = next(r for r in p.reasons if r.startswith("4x L4 FSDP: the cheapest shape per job"))
    assert "3.20/h x" in chosen and "per 1,000 steps" in chosen
    versus = next(r for r in p.reasons if r.startswith("vs 1x A100-80GB: 3.43/h x"))
    assert "x the cost" in versus and "x the time" in versus
    one = next(a for a in p.alternatives if a.label() == "1x A100-80GB")
    assert one.job_cost_ratio > 1.2 and one.time_ratio > 1  # dearer and slower than 4 L4s
    assert "fewer L4s do not hold it: 2 would need 31.1 GiB per GPU; 1 would need 46.7 GiB per GPU" in text
    assert "strategy fsdp: weights, gradients and optimizer states sharded over 4 ranks" in text
    faster = next(r for r in p.reasons if r.startswith("vs 8x L4 FSDP"))
    assert "faster but dearer (to ask for it: gpuClass L4, gpuCount 8, strategy fsdp)" in faster


def test_a_job_on_one_gpu_names_the_faster_data_parallel_shapes_it_did_not_take() -> None:
    p = plan(L8)
    ddp = next(r for r in p.reasons if r.startswith("vs 2x L4 DDP"))
    assert "faster but dearer (to ask for it: gpuClass L4, gpuCount 2, strategy ddp)" in ddp
    dearer = next(r for r in p.reasons if r.startswith("not considered: classes dearer per GPU-hour than L4"))
    assert "data-sheet speeds" in dearer


def test_the_cost_is_for_the_jobs_steps_when_the_spec_gives_them() -> None:
    p = plan(L70, training={"maxSteps": 500})
    assert p.steps == 500 and p.steps_known and p.summary()["estimatedFor"] == "500 steps"
    assert any("for 500 steps, estimated" in r for r in p.reasons)


def test_the_plan_summary_carries_the_shape() -> None:
    summary = plan(L70).summary()
    assert (summary["gpuClass"], summary["gpuCount"], summary["strategy"], summary["nodes"]) == ("L4", 4, "fsdp", 1)
    assert summary["estimatedHours"] > 0 and summary["estimatedCost"] > 0
    assert {"strategy", "jobCostRatio", "timeRatio", "note"} <= set(summary["alternatives"][0])


# --- maxGpuCount and strategy: validated like every field, and honoured -------------------------------------

@pytest.mark.parametrize(("resources", "message"), [
    ({"maxGpuCount": 0}, "spec.resources.maxGpuCount: must be >= 1, got 0"),
    ({"maxGpuCount": 65}, "spec.resources.maxGpuCount: must be <= 64, got 65"),
    ({"maxGpuCount": "4"}, "spec.resources.maxGpuCount: must be an integer, got '4'"),
    ({"maxGpuCount": True}, "spec.resources.maxGpuCount: must be an integer, got True"),
    ({"maxGpuCount": 2.5}, "spec.resources.maxGpuCount: must be an integer, got 2.5"),
    ({"strategy": "pipeline"}, "spec.resources.strategy: must be one of: auto, ddp or fsdp; got 'pipeline'"),
    ({"strategy": "FSDP"}, "spec.resources.strategy: must be one of: auto, ddp or fsdp; got 'FSDP'"),
    ({"strategy": None}, "spec.resources.strategy: must be one of: auto, ddp or fsdp; got None"),
])
def test_bad_strategy_and_count_cap_name_the_field(resources: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError) as info:
        plan(L8, resources=resources)
    assert message in str(info.value)


def test_a_pinned_count_above_the_cap_or_a_cap_nothing_fits_under_is_a_plan_error_naming_the_fields() -> None:
    with pytest.raises(PlanError, match=r"spec\.resources\.gpuCount: 4 is above spec\.resources\.maxGpuCount 2"):
        plan(L70, resources={"strategy": "fsdp", "gpuCount": 4, "maxGpuCount": 2})
    with pytest.raises(PlanError, match=r"spec\.resources\.gpuClass: L4 .* cannot hold this job"):
        plan(L70, resources={"strategy": "fsdp", "gpuClass": "L4", "maxGpuCount": 2})
    with pytest.raises(PlanError, match=r"spec\.resources\.maxGpuCount: no class holds this job on up to 1 GPU"):
        plan("meta-llama/Llama-3.1-405B", resources={"maxGpuCount": 1})


# --- against a cluster: GPUs counted per node ----------------------------------------------------------------

def l4_nodes(*gpus: int) -> Inventory:
    return Inventory(tuple(NodeInfo(f"l4-{i}", L4_LABELS, n) for i, n in enumerate(gpus)))


def catalog_with_l4_per_node(per_node: int) -> GpuCatalog:
    base = default_catalog()
    return GpuCatalog(tuple(dataclasses.replace(g, max_per_node=per_node) if g.name == "L4" else g
                            for g in base.classes), base.headroom)


def test_a_cluster_of_4_gpu_l4_nodes_runs_70b_as_fsdp_on_one_of_them() -> None:
    supply = supply_of(l4_nodes(4, 4), default_catalog())
    p = plan(L70, supply)
    assert (p.label(), p.nodes) == ("4x L4 FSDP", 1)
    assert place(p.gpu_class, p.gpu_count // p.nodes, l4_nodes(4, 4), default_catalog(), nodes=p.nodes).kind == \
        "Placed"


def test_a_shape_larger_than_the_clusters_nodes_is_skipped_with_the_reason_and_the_catalog_fix() -> None:
    """70B at 4096 tokens: 8 L4s with FSDP, or the layer split over 4. The catalog says 8 L4s fit a node; these
    nodes have 4, so the planner takes the layer split the cluster can run, and says what it gave up and why."""
    job = {"training": {"maxSeqLength": 4096}, "resources": {"maxGpuClass": "A10G"}}
    assert plan(L70, **job).label() == "8x L4 FSDP"  # no cluster
    p = plan(L70, supply_of(l4_nodes(4, 4), default_catalog()), **job)
    assert p.label() == "4x L4 layer split"
    assert any(r.startswith("L4: its nodes have at most 4 GPUs and it is not provisionable (the GPU catalog says 8 "
                            "per node: set maxPerNode: 4 for L4") for r in p.reasons), p.reasons
    skipped = next(a for a in p.alternatives if a.label() == "8x L4 FSDP")
    assert skipped.job_cost_ratio < 0.5 and skipped.note.startswith("L4: its nodes have at most 4 GPUs")


def test_with_the_catalog_saying_4_per_node_8_l4s_span_2_nodes_when_2_are_there() -> None:
    job = {"training": {"maxSeqLength": 4096}, "resources": {"maxGpuClass": "A10G"}}
    catalog = catalog_with_l4_per_node(4)
    two = l4_nodes(4, 4)
    p = plan(L70, supply_of(two, catalog), catalog, **job)
    assert (p.label(), p.nodes) == ("8x L4 FSDP on 2 nodes", 2)
    assert any("sharded over 8 ranks on 2 nodes of 4" in r for r in p.reasons)
    assert place(p.gpu_class, 4, two, catalog, nodes=2).kind == "Placed"
    busy = Inventory(two.nodes, {"l4-0": 1})  # the planner counts allocatable GPUs; placement counts free ones
    assert place(p.gpu_class, 4, busy, catalog, nodes=2).kind == "Busy"

    one = l4_nodes(4, 2)  # only one node with 4
    q = plan(L70, supply_of(one, catalog), catalog, **job)
    assert any("L4: 8 GPUs as 2 nodes x 4 need 2 nodes with 4 allocatable GPUs each; 1 of its nodes have that "
               "many (GPUs per node: 4, 2)" in r for r in q.reasons), q.reasons
    assert place("L4", 4, one, catalog, nodes=2).kind == "NoNodes"


@pytest.mark.parametrize(("sizes", "count", "nodes", "expected"), [
    ((8,), 8, 1, None),
    ((4, 4), 4, 2, None),
    ((4, 4, 2), 4, 3, "L4: 12 GPUs as 3 nodes x 4 need 3 nodes with 4 allocatable GPUs each; 2 of its nodes have "
                      "that many (GPUs per node: 4, 4, 2)"),
    ((4,), 8, 1, "L4: its nodes have at most 4 GPUs and it is not provisionable"),
    ((), 1, 1, "L4: no nodes in the cluster and not provisionable"),
])
def test_supply_counts_gpus_per_node(sizes: tuple[int, ...], count: int, nodes: int, expected: str | None) -> None:
    gpu = default_catalog().get("L4", "x")
    supply = supply_of(l4_nodes(*sizes), default_catalog())
    got = supply.why_not(gpu, count, nodes)
    assert got == expected or (expected is not None and got is not None and got.startswith(expected))
    assert Supply(provisionable=frozenset({"L4"})).why_not(gpu, count, nodes) is None  # the autoscaler adds nodes


def test_supply_and_placement_see_the_same_nodes() -> None:
    """Cordoned nodes count for neither; the planner counts allocatable GPUs, placement free ones."""
    inventory = Inventory((NodeInfo("a", L4_LABELS, 4), NodeInfo("b", L4_LABELS, 4, schedulable=False)))
    supply = supply_of(inventory, default_catalog())
    assert supply.node_gpus == (("L4", (4,)),) and supply.nodes == (("L4", 4),)
    gpu = default_catalog().get("L4", "x")
    assert supply.why_not(gpu, 4, 2) is not None and place("L4", 4, inventory, default_catalog(), nodes=2).kind == \
        "NoNodes"
    assert supply.why_not(gpu, 4, 1) is None and place("L4", 4, inventory, default_catalog()).kind == "Placed"


@pytest.mark.parametrize(("gpus", "per_node", "split"), [
    (1, 8, (1, 1)), (8, 8, (1, 8)), (8, 4, (2, 4)), (6, 4, (2, 3)), (16, 4, (4, 4)), (5, 4, None), (0, 4, None),
])
def test_node_split(gpus: int, per_node: int, split: tuple[int, int] | None) -> None:
    assert node_split(gpus, per_node) == split


def test_a_pinned_class_still_takes_a_shape_its_nodes_can_run() -> None:
    """16-bit 8B on A100-40GBs: 2 FSDP ranks cost less per job than 1 GPU (sharding frees the memory to skip
    the recompute), but a cluster whose A100-40GB nodes have 1 GPU runs it on one."""
    a100_40 = {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB"}
    job = {"method": "lora", "resources": {"gpuClass": "A100-40GB"}}
    assert plan(L8, **job).label() == "2x A100-40GB FSDP"  # no cluster
    one_gpu = supply_of(Inventory((NodeInfo("a100-1", a100_40, 1),)), default_catalog())
    assert plan(L8, one_gpu, **job).label() == "1x A100-40GB"
    none = supply_of(l4_nodes(4), default_catalog())  # no node of the pinned class: planned as if, and waits
    p = plan(L8, none, **job)
    assert p.label() == "2x A100-40GB FSDP"
    assert any(r.startswith("the cluster cannot run it on the pinned class (A100-40GB: no nodes in the cluster")
               and r.endswith("waits for a node of it") for r in p.reasons)
