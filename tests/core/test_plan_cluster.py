"""Planning against the GPU classes a cluster offers: nodes it has now, or classes it can provision."""

from __future__ import annotations

import pytest

from kubetune.planning.gpus import default_catalog, load_catalog
from kubetune.planning.models import catalog_lookup
from kubetune.planning.placement import Inventory, NodeInfo, Supply, supply_of
from kubetune.planning.plan import make_plan
from kubetune.spec import parse_spec

A10G = {"nvidia.com/gpu.product": "NVIDIA-A10G"}
A100_80 = {"karpenter.k8s.aws/instance-gpu-name": "a100", "karpenter.k8s.aws/instance-gpu-memory": "81920"}
L4 = {"cloud.google.com/gke-accelerator": "nvidia-l4"}
# The cluster of the bug report: two A10G nodes and one A100-80GB node, no L4.
G5_P4D = Inventory((NodeInfo("g5-1", A10G, 1), NodeInfo("g5-2", A10G, 1), NodeInfo("p4d-1", A100_80, 8)))


def plan(model: str, supply: Supply | None, catalog=None, above: str | None = None, **spec):  # type: ignore[no-untyped-def]
    body = {"model": {"name": model}, "dataset": {"source": "s3://datasets/x.jsonl"},
            "output": {"uri": "s3://adapters/x/"}, **spec}
    return make_plan(parse_spec(body), catalog_lookup(model), catalog or default_catalog(), above=above,
                     supply=supply)


def test_supply_lists_the_classes_with_schedulable_gpu_nodes() -> None:
    inventory = Inventory((*G5_P4D.nodes, NodeInfo("cordoned", L4, 1, schedulable=False), NodeInfo("cpu", {}, 0)))
    supply = supply_of(inventory, default_catalog())
    assert supply.nodes == (("A100-80GB", 8), ("A10G", 1))
    assert supply.provisionable == frozenset()


@pytest.mark.parametrize("model", ["meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.2-1B-Instruct"])
def test_small_jobs_go_to_the_cheapest_class_the_cluster_has_and_say_what_was_skipped(model: str) -> None:
    anywhere = plan(model, None)
    assert anywhere.gpu_class == "L4"  # no cluster: the whole catalog
    p = plan(model, supply_of(G5_P4D, default_catalog()))
    assert (p.gpu_class, p.gpu_count) == ("A10G", 1)
    assert "L4: no nodes in the cluster and not provisionable" in p.reasons


def test_a_provisionable_class_is_a_candidate_without_nodes() -> None:
    catalog = load_catalog(provisionable=("L4",))
    p = plan("meta-llama/Llama-3.1-8B-Instruct", supply_of(G5_P4D, catalog), catalog)
    assert p.gpu_class == "L4"
    assert "L4: no node yet, but provisionable (its node pool scales up from zero)" in p.reasons


def test_provisionable_per_class_in_the_catalog_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    override = tmp_path / "gpus.yaml"
    override.write_text("classes:\n  - {name: L4, memoryGiB: 22.5, hourlyPrice: 0.8, provisionable: true,\n"
                        "     nodeLabels: [{nvidia.com/gpu.product: NVIDIA-L4}]}\n")
    catalog = load_catalog(override, provisionable=())
    assert catalog.get("L4", "x").provisionable and not catalog.get("A10G", "x").provisionable
    override.write_text("classes:\n  - {name: L4, memoryGiB: 22.5, hourlyPrice: 0.8, provisionable: sometimes}\n")
    with pytest.raises(Exception, match=r"classes\[0\].provisionable: must be true or false"):
        load_catalog(override, provisionable=())


def test_a_big_job_takes_the_big_class_the_cluster_has() -> None:
    # 14B in 16 bits: 8B 16-bit LoRA now fits an A10G (issue 13)
    p = plan("Qwen/Qwen2.5-14B-Instruct", supply_of(G5_P4D, default_catalog()), method="lora")
    assert p.gpu_class == "A100-80GB"  # the catalog's A100-40GB is cheaper, but the cluster has none
    assert "A100-40GB: no nodes in the cluster and not provisionable" in p.reasons


def test_nothing_in_the_cluster_holds_it_plans_on_the_catalog_and_says_it_waits() -> None:
    only_a10g = supply_of(Inventory((NodeInfo("g5-1", A10G, 1),)), default_catalog())
    p = plan("meta-llama/Llama-3.1-70B-Instruct", only_a10g)
    # the catalog's cheapest shape per job (issue 12): 4 L4s with FSDP, where 1 A100-80GB was planned before
    assert (p.gpu_class, p.gpu_count, p.strategy) == ("L4", 4, "fsdp")
    assert "A10G: its nodes have at most 1 GPU and it is not provisionable (the GPU catalog says 8 per node" \
        in p.reasons[1]
    assert any("no class the cluster has nodes of or can provision holds it" in r and "waits" in r
               for r in p.reasons)


def test_oom_escalation_stays_within_what_the_cluster_offers() -> None:
    p = plan("meta-llama/Llama-3.1-8B-Instruct", supply_of(G5_P4D, default_catalog()), above="A10G")
    assert p.gpu_class == "A100-80GB"


def test_a_pinned_class_is_kept_even_when_the_cluster_lacks_it() -> None:
    p = plan("meta-llama/Llama-3.1-8B-Instruct", supply_of(G5_P4D, default_catalog()),
             resources={"gpuClass": "L4"})
    assert p.gpu_class == "L4"


def test_too_few_gpus_per_node_skips_the_class() -> None:
    supply = Supply(nodes=(("A100-80GB", 1), ("H200-141GB", 8)))
    p = plan("meta-llama/Llama-3.1-405B-Instruct", supply)
    assert p.gpu_class == "H200-141GB"
