from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

from kubetune.crd import crd, crd_yaml

ROOT = Path(__file__).resolve().parents[2]


def test_committed_crd_matches_the_spec_model() -> None:
    committed = (ROOT / "manifests" / "crd.yaml").read_text()
    assert committed == crd_yaml(), "manifests/crd.yaml drifted: run `kubetune crd > manifests/crd.yaml`"


def test_crd_validates_against_kubernetes_schemas() -> None:
    kubernetes_validate.validate(crd(), "1.31", strict=True)


def _walk(node: dict[str, Any], path: str = "") -> list[str]:
    """Paths of schema nodes that break the structural-schema rules the API server enforces."""
    problems = []
    special = node.get("x-kubernetes-int-or-string") or node.get("x-kubernetes-preserve-unknown-fields")
    if "type" not in node and not special:
        problems.append(f"{path or '<root>'}: no type")
    for forbidden in ("$ref", "anyOf", "oneOf", "allOf", "additionalProperties" if "properties" in node else "-"):
        if forbidden in node:
            problems.append(f"{path}: {forbidden}")
    for name, child in node.get("properties", {}).items():
        problems.extend(_walk(child, f"{path}.{name}"))
    if "items" in node:
        problems.extend(_walk(node["items"], f"{path}[]"))
    return problems


def test_schema_is_structural() -> None:
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert _walk(schema) == []


def test_short_name_status_subresource_and_columns() -> None:
    doc = yaml.safe_load(crd_yaml())
    version = doc["spec"]["versions"][0]
    assert doc["spec"]["names"]["shortNames"] == ["ftj"]
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")]
    assert columns == ["Phase", "GPU", "VRAM", "Step", "Loss", "Age"]


def test_schema_keeps_constraints_from_the_model() -> None:
    spec = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    lora = spec["properties"]["lora"]["properties"]
    assert lora["r"] == {"type": "integer", "description": "LoRA rank.", "minimum": 1, "maximum": 1024}
    assert spec["properties"]["method"]["enum"] == ["qlora", "lora"]
    assert spec["properties"]["training"]["properties"]["microBatchSize"]["x-kubernetes-int-or-string"] is True
    assert set(spec["required"]) == {"model", "dataset", "output"}
