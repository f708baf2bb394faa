"""The planner sizes the pod for the streamed merged export (spec.output.mergedModel): host memory grows by about
two 16-bit copies of the largest weight (not the whole model), disk by one output shard."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from test_pod_budget import job_for, plan_for, pod_of, spec

from kubetune.planning.budget import MERGE_SCRATCH_BYTES, MERGE_SHARD_BYTES, pod_budget


def test_the_budget_adds_the_largest_weight_not_the_model() -> None:
    plain = pod_budget(70_000_000_000, 200_000_000, 16384, True)
    merged = pod_budget(70_000_000_000, 200_000_000, 16384, True, merged=True, largest_weight_params=1_050_673_152)
    extra = merged.host_memory_bytes - plain.host_memory_bytes
    assert 2 * 2 * 1_050_673_152 + MERGE_SCRATCH_BYTES <= extra <= 2 * 2 * 1_050_673_152 + MERGE_SCRATCH_BYTES + 2**30
    assert extra < 140e9 / 20  # merge_and_unload would hold the whole 16-bit model: 140 GB
    assert merged.ephemeral_storage_bytes - plain.ephemeral_storage_bytes == MERGE_SHARD_BYTES


def test_a_70b_merged_export_fits_the_pod_sized_for_qlora() -> None:
    job = spec({"name": "meta-llama/Llama-3.1-70B"}, output={"uri": "s3://adapters/x/", "mergedModel": True})
    plan = plan_for(job)
    assert plan.largest_weight_params == 8192 * 128256  # the embedding
    without = job.model_copy(update={"output": job.output.model_copy(update={"merged_model": False})})
    merged_pod, plain_pod = pod_of(job_for(job)), pod_of(job_for(without))
    merged_res = merged_pod["containers"][0]["resources"]["requests"]
    plain_res = plain_pod["containers"][0]["resources"]["requests"]
    grew = int(merged_res["memory"].removesuffix("Gi")) - int(plain_res["memory"].removesuffix("Gi"))
    assert 5 <= grew <= 6  # 2 x 2.1 GB + scratch, where the whole-model merge needed 140 GB more
    assert int(merged_res["ephemeral-storage"].removesuffix("Gi")) == int(
        plain_res["ephemeral-storage"].removesuffix("Gi")) + 1
