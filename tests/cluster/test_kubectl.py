"""kubectl 1.32 against the emulator: apply (validated against /openapi/v3), get with printer columns (Table),
short names, delete."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from kt_cluster import NS, Cluster
from kt_kubectl import Kubectl

FTJ = """apiVersion: kubetune.io/v1alpha1
kind: FineTuneJob
metadata:
  name: hello
spec:
  model: {name: HuggingFaceTB/SmolLM2-135M-Instruct}
  dataset: {source: s3://data/train.jsonl, format: chat}
  training: {maxSteps: 10}
  output: {uri: s3://out/hello/}
"""


@pytest.fixture
def kubectl(cluster: Cluster, tmp_path: Path) -> Kubectl:
    return Kubectl(cluster.url, tmp_path / "kubectl", namespace=NS)


def columns(text: str) -> list[dict[str, str]]:
    """kubectl's aligned table -> one dict per row (cells split at the header's column starts)."""
    header, *rows = text.rstrip("\n").splitlines()
    names = header.split()
    starts = [header.index(n) for n in names]
    bounds = list(zip(starts, [*starts[1:], None], strict=True))
    return [{n: row[a:b].strip() for n, (a, b) in zip(names, bounds, strict=True)} for row in rows]


async def test_apply_get_delete(cluster: Cluster, kubectl: Kubectl, tmp_path: Path) -> None:
    manifest = tmp_path / "ftj.yaml"
    manifest.write_text(FTJ)
    applied = await kubectl("apply", "-f", str(manifest))
    assert (applied.code, applied.out.strip(), applied.err) == (0, "finetunejob.kubetune.io/hello created", "")
    stored = cluster.ftj("hello")
    assert json.loads(stored["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"])[
        "spec"]["training"] == {"maxSteps": 10}
    again = await kubectl("apply", "-f", str(manifest))
    assert again.out.strip() == "finetunejob.kubetune.io/hello unchanged"
    manifest.write_text(FTJ.replace("maxSteps: 10", "maxSteps: 20"))
    changed = await kubectl("apply", "-f", str(manifest))
    assert changed.out.strip() == "finetunejob.kubetune.io/hello configured"
    assert cluster.ftj("hello")["spec"]["training"] == {"maxSteps": 20}
    assert cluster.ftj("hello")["metadata"]["generation"] == 2

    await cluster.api.patch_object("finetunejobs", NS, "hello", {"status": {
        "phase": "Running", "gpu": "A10G x1", "vram": "5.1Gi", "step": "7/20", "loss": "1.234",
        "message": "training on gpu-a10g-1"}})
    listed = await kubectl("get", "ftj")
    assert listed.code == 0 and listed.err == "", listed.err
    [row] = columns(listed.out)
    assert row == {"NAME": "hello", "PHASE": "Running", "GPU": "A10G x1", "VRAM": "5.1Gi", "STEP": "7/20",
                   "LOSS": "1.234", "AGE": row["AGE"]} and row["AGE"].endswith("s")
    wide = await kubectl("get", "finetunejob", "hello", "-o", "wide")
    assert columns(wide.out)[0]["MESSAGE"] == "training on gpu-a10g-1"  # priority-1 columns only with -o wide
    by_category = await kubectl("get", "kubetune", "-o", "name")
    assert by_category.out.strip() == "finetunejob.kubetune.io/hello"
    as_yaml = yaml.safe_load((await kubectl("get", "ftj", "hello", "-o", "yaml")).out)
    assert as_yaml["status"]["phase"] == "Running" and as_yaml["kind"] == "FineTuneJob"
    as_json = json.loads((await kubectl("get", "ftj", "-o", "json")).out)
    assert [i["metadata"]["name"] for i in as_json["items"]] == ["hello"]

    deleted = await kubectl("delete", "-f", str(manifest))
    assert deleted.code == 0 and 'finetunejob.kubetune.io "hello" deleted' in deleted.out
    assert cluster.api.read("finetunejobs", NS, "hello") is None
    empty = await kubectl("get", "ftj")
    assert empty.code == 0 and "No resources found in ml namespace." in empty.err


async def test_apply_validates_fields_against_the_crd_schema(cluster: Cluster, kubectl: Kubectl) -> None:
    typo = FTJ.replace("training: {maxSteps: 10}", "trainig: {maxSteps: 10}")
    refused = await kubectl("apply", "-f", "-", stdin=typo)
    assert refused.code != 0 and 'unknown field "spec.trainig"' in refused.err
    assert cluster.api.read("finetunejobs", NS, "hello") is None
    pruned = await kubectl("apply", "--validate=false", "-f", "-", stdin=typo)
    assert pruned.code == 0, pruned.err
    assert "trainig" not in cluster.ftj("hello")["spec"]  # the structural schema prunes what it does not declare


async def test_get_built_in_kinds(cluster: Cluster, kubectl: Kubectl) -> None:
    nodes = await kubectl("get", "nodes")
    assert nodes.code == 0, nodes.err
    assert {r["NAME"] for r in columns(nodes.out)} == {n["metadata"]["name"] for n in cluster.api.items("nodes")}
    assert (await kubectl("get", "jobs")).err.strip() == "No resources found in ml namespace."
