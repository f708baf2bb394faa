"""The planner's decisions across the catalog, and `kubetune plan -o json`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune.errors import PlanError
from kubetune.planning.gpus import default_catalog, load_catalog
from kubetune.planning.models import catalog_lookup
from kubetune.planning.plan import make_plan
from kubetune.planning.vram import GiB
from kubetune.spec import parse_spec

ROOT = Path(__file__).resolve().parents[2]


def plan(model: str, catalog=None, above: str | None = None, **spec):
    body = {"model": {"name": model}, "dataset": {"source": "s3://datasets/x.jsonl"},
            "output": {"uri": "s3://adapters/x/"}, **spec}
    return make_plan(parse_spec(body), catalog_lookup(model), catalog or default_catalog(), above=above)


@pytest.mark.parametrize(
    ("model", "method", "gpu_class", "count", "strategy"),
    [
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "qlora", "L4", 1, "single"),
        ("meta-llama/Llama-3.2-1B-Instruct", "qlora", "L4", 1, "single"),
        ("meta-llama/Llama-3.1-8B-Instruct", "qlora", "L4", 1, "single"),
        ("mistralai/Mistral-7B-Instruct-v0.3", "qlora", "L4", 1, "single"),
        ("Qwen/Qwen2.5-14B-Instruct", "qlora", "L4", 1, "single"),
        ("meta-llama/Llama-3.1-8B-Instruct", "lora", "L4", 1, "single"),  # 16-bit 8B fits 24 GB (issue 13)
        # issue 12: what fits no 24 GB GPU shards over L4s with FSDP when that costs less per job than one
        # bigger GPU (1x A100-40GB / A100-80GB before; test_plan_shapes.py has the figures)
        ("Qwen/Qwen2.5-32B-Instruct", "qlora", "L4", 2, "fsdp"),
        ("meta-llama/Llama-3.1-70B-Instruct", "qlora", "L4", 4, "fsdp"),
        # Qwen's 152k-token tables (lm_head gathered through the step) and Mixtral's 47B of whole quantization
        # constants per rank take one step more than Llama-70B and Qwen-32B
        ("Qwen/Qwen2.5-72B-Instruct", "qlora", "L4", 8, "fsdp"),
        ("mistralai/Mixtral-8x7B-Instruct-v0.1", "qlora", "L4", 4, "fsdp"),
        # no single GPU holds 405B: 8 A100-80GB with FSDP, not the layer split over 2 H200 (2.4x the cost per job)
        ("meta-llama/Llama-3.1-405B-Instruct", "qlora", "A100-80GB", 8, "fsdp"),
    ],
)
def test_catalog_models_land_on_sensible_classes(model, method, gpu_class, count, strategy) -> None:
    p = plan(model, method=method)
    assert (p.gpu_class, p.gpu_count, p.strategy) == (gpu_class, count, strategy), p.reasons
    assert p.vram_estimate_bytes <= p.usable_bytes_per_gpu
    assert all(a.job_cost_ratio >= 1 for a in p.alternatives if not a.note)  # the cheapest candidate per job


def test_lora_8b_needs_far_more_than_its_qlora_twin() -> None:
    q = plan("meta-llama/Llama-3.1-8B", method="qlora", training={"microBatchSize": 1, "gradientCheckpointing": True})
    f = plan("meta-llama/Llama-3.1-8B", method="lora", training={"microBatchSize": 1, "gradientCheckpointing": True})
    assert f.vram_estimate_bytes > 1.7 * q.vram_estimate_bytes


def test_fastest_knobs_turn_checkpointing_off_when_it_fits() -> None:
    p = plan("meta-llama/Llama-3.2-1B")
    assert p.knobs.gradient_checkpointing is False
    assert any("checkpointing off" in r for r in p.reasons)


def test_micro_batch_keeps_the_effective_batch() -> None:
    p = plan("HuggingFaceTB/SmolLM2-135M", training={"gradientAccumulationSteps": 16})
    assert p.knobs.micro_batch_size * p.knobs.gradient_accumulation_steps == 16
    assert p.knobs.micro_batch_size > 1


def test_pinned_knobs_are_respected() -> None:
    p = plan("meta-llama/Llama-3.1-8B", training={"microBatchSize": 1, "gradientCheckpointing": True})
    assert (p.knobs.micro_batch_size, p.knobs.gradient_checkpointing) == (1, True)
    assert any("set by the spec" in r for r in p.reasons)


def test_pinned_class_is_used_even_if_not_cheapest() -> None:
    p = plan("meta-llama/Llama-3.1-8B", resources={"gpuClass": "H100-80GB"})
    assert p.gpu_class == "H100-80GB" and p.gpu_count == 1
    assert p.knobs.gradient_checkpointing is False  # 80 GB holds it without recompute


def test_max_gpu_class_shards_instead_of_going_bigger() -> None:
    p = plan("meta-llama/Llama-3.1-70B", resources={"maxGpuClass": "A100-40GB"})
    assert (p.gpu_class, p.gpu_count, p.strategy) == ("L4", 4, "fsdp")  # the layer split over 2 A100-40GB before
    p = plan("meta-llama/Llama-3.1-70B", resources={"maxGpuClass": "A100-40GB", "maxGpuCount": 2})
    assert (p.gpu_class, p.gpu_count, p.strategy) == ("A100-40GB", 2, "fsdp")


def test_oom_escalation_moves_to_a_larger_class() -> None:
    first = plan("meta-llama/Llama-3.1-8B")
    second = plan("meta-llama/Llama-3.1-8B", above=first.gpu_class)
    assert second.gpu_memory_bytes > first.gpu_memory_bytes
    assert any("escalated past" in r for r in second.reasons)


def test_oom_escalation_respects_max_gpu_class() -> None:
    with pytest.raises(PlanError, match=r"status\.plan\.gpuClass: no class above A100-80GB"):
        plan("meta-llama/Llama-3.1-70B", above="A100-80GB", resources={"maxGpuClass": "A100-80GB"})


def test_a_pinned_class_is_never_escalated() -> None:
    with pytest.raises(PlanError, match=r"spec\.resources\.gpuClass: pinned to A10G, and a pinned class is never"):
        plan("meta-llama/Llama-3.1-8B", above="A10G", resources={"gpuClass": "A10G"})
    # pinning a larger class after the OOM is the user's way out
    assert plan("meta-llama/Llama-3.1-8B", above="A10G", resources={"gpuClass": "A100-40GB"}).gpu_class == "A100-40GB"


def test_nothing_fits_is_a_clear_error() -> None:
    with pytest.raises(PlanError, match="no class in the catalog holds it"):
        plan("meta-llama/Llama-3.1-405B", method="lora", training={"maxSeqLength": 131072})


def test_catalog_override_adds_and_replaces_classes(tmp_path: Path) -> None:
    override = tmp_path / "gpus.yaml"
    override.write_text(
        "headroom: 0.05\n"
        "classes:\n"
        "  - {name: RTX-4090, memoryGiB: 23.6, hourlyPrice: 0.40,\n"
        "     nodeLabels: [{nvidia.com/gpu.product: NVIDIA-GeForce-RTX-4090}]}\n"
        "  - {name: L4, memoryGiB: 22.5, hourlyPrice: 5.0, nodeLabels: [{nvidia.com/gpu.product: NVIDIA-L4}]}\n"
    )
    catalog = load_catalog(override)
    assert catalog.headroom == 0.05
    p = plan("meta-llama/Llama-3.1-8B", catalog=catalog)
    assert p.gpu_class == "RTX-4090"
    assert catalog.get("L4", "x").hourly_price == 5.0


def test_bad_catalog_override_names_the_file(tmp_path: Path) -> None:
    override = tmp_path / "gpus.yaml"
    override.write_text("classes:\n  - {name: X}\n")
    with pytest.raises(Exception, match=r"gpus.yaml: classes\[0\]: needs name, memoryGiB, hourlyPrice"):
        load_catalog(override)


def test_node_labels_cover_gfd_and_cloud_providers() -> None:
    catalog = default_catalog()
    assert catalog.class_of_node({"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}).name == "A100-80GB"
    assert catalog.class_of_node({"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}).name == "H100-80GB"
    assert catalog.class_of_node({"karpenter.k8s.aws/instance-gpu-name": "a10g"}).name == "A10G"
    assert catalog.class_of_node({"node.kubernetes.io/instance-type": "Standard_ND96isr_H100_v5"}).name == "H100-80GB"
    assert catalog.class_of_node({"kubernetes.io/os": "linux"}) is None


def test_plan_json_output_shape(run_plan, job) -> None:
    code, out, _ = run_plan(job, "-o", "json")
    assert code == 0
    data = json.loads(out)
    assert set(data) >= {"gpuClass", "gpuCount", "vramEstimateBytes", "breakdown", "knobs", "reasons"}
    assert data["vramEstimateBytes"] == sum(data["breakdown"].values())
    assert data["gpuClass"] == "L4"
    assert data["knobs"]["gradientCheckpointing"] is True


def test_plan_json_is_a_list_for_multi_document_yaml(run_plan, job) -> None:
    other = json.loads(json.dumps(job))
    other["spec"]["model"]["name"] = "meta-llama/Llama-3.1-70B-Instruct"
    code, out, _ = run_plan([job, other], "-o", "json")
    assert code == 0
    assert [(d["gpuClass"], d["gpuCount"], d["strategy"]) for d in json.loads(out)] == [
        ("L4", 1, "single"), ("L4", 4, "fsdp")]


def test_plan_table_explains_the_decision(run_plan, job) -> None:
    code, out, _ = run_plan(job)
    assert code == 0
    for text in ("1x L4", "VRAM estimate per GPU", "base_weights", "logits", "Knobs", "Why", "Shapes compared",
                 "chosen", "2x L4 DDP", "x cost", "x time", "1x A100-40GB", "not a candidate"):
        assert text in out


def test_every_example_plans(run_plan) -> None:
    import yaml

    examples = sorted((ROOT / "examples").glob("*.yaml"))
    assert examples, "examples/ has no FineTuneJobs"
    for path in examples:
        code, _, err = run_plan(path.read_text(), "-o", "json")
        assert code == 0, f"{path.name}: {err}"
        assert yaml.safe_load_all(path.read_text())


def test_estimate_in_gib_for_the_readme_example() -> None:
    p = plan("meta-llama/Llama-3.1-8B-Instruct", training={"microBatchSize": 1, "gradientCheckpointing": True})
    assert p.vram_estimate_bytes / GiB == pytest.approx(7.9, abs=0.3)  # 12.3 before issue 13
