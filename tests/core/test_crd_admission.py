"""Issue 11 finding 9: the CRD refuses at `kubectl apply` what the spec model refuses.

Every row of the bad-values table (test_spec_fields.BAD_VALUES) and every missing required field goes
through the CRD the way kube-apiserver admits a create (kt_admission: structural schema, strict field
validation, CEL rules evaluated with cel-python). Rows that depend on the GPU catalog (the chart can add
classes) are the validating webhook's (tests/operator/test_webhook.py), and only those.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from conftest import BASE_JOB, DELETE, set_path
from kt_admission import admit, program
from test_spec_fields import BAD_VALUES

from kubetune.crd import crd

ROOT = Path(__file__).resolve().parents[2]
CATALOG_ROWS = {"spec.resources.gpuClass", "spec.resources.maxGpuClass"}  # the webhook's (catalog-dependent)
CRD = crd()


def rows(catalog: bool) -> list[tuple[str, Any, str]]:
    return [row for row in BAD_VALUES if (row[0] in CATALOG_ROWS) == catalog]


@pytest.mark.parametrize(("path", "value", "message"), rows(catalog=False),
                         ids=[f"{p}={v!r}" for p, v, _ in rows(catalog=False)])
def test_every_bad_value_is_refused_by_the_crd(path: str, value: Any, message: str) -> None:
    job = set_path(copy.deepcopy(BASE_JOB), path, value)
    errors = admit(CRD, job)
    assert errors, f"the CRD admits {path}={value!r}, which the spec model refuses ({message})"
    assert any(e.startswith(path) for e in errors), errors  # named at the field


@pytest.mark.parametrize("path", ["spec.dataset.source", "spec.output.uri", "spec.dataset", "spec.output",
                                  "spec.model", "metadata.name", "spec"])
def test_missing_required_fields_are_refused_by_the_crd(path: str) -> None:
    errors = admit(CRD, set_path(copy.deepcopy(BASE_JOB), path, DELETE))
    assert any(e.startswith(path) for e in errors), errors


@pytest.mark.parametrize(("path", "value"), [(p, v) for p, v, _ in rows(catalog=True)])
def test_catalog_rows_are_left_to_the_webhook(path: str, value: Any) -> None:
    """The chart may add GPU classes (gpuCatalog), so the CRD cannot know them: the webhook refuses these."""
    assert admit(CRD, set_path(copy.deepcopy(BASE_JOB), path, value)) == []


@pytest.mark.parametrize("path", [BASE_JOB, *sorted((ROOT / "examples").glob("*.yaml"))],
                         ids=lambda p: getattr(p, "name", "base-job"))
def test_good_jobs_are_admitted(path: Any) -> None:
    docs = [path] if isinstance(path, dict) else [d for d in yaml.safe_load_all(path.read_text()) if d]
    for doc in docs:
        if doc.get("kind") == "FineTuneJob":
            assert admit(CRD, doc) == []


@pytest.mark.parametrize(("path", "value"), [
    ("spec.training.microBatchSize", 4), ("spec.training.microBatchSize", "auto"),
    ("spec.resources.gpuCount", 8), ("spec.training.gradientCheckpointing", False),
    ("spec.lora.targetModules", ["q_proj", "v_proj"]), ("spec.model", {"source": "bundled://smollm2-135m-instruct"}),
    ("spec.model", {"source": "/models/llama.gguf"}), ("spec.output.credentialsSecret", "s3.creds-1"),
    ("spec.dataset.source", "s3://my.bucket-1/x/train.jsonl"),
])
def test_edge_values_the_model_accepts_are_admitted(path: str, value: Any) -> None:
    from kubetune.spec import parse_job

    job = set_path(copy.deepcopy(BASE_JOB), path, value)
    parse_job(job)
    assert admit(CRD, job) == []


def walk_rules(node: Any, path: str = "") -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    found = []
    if isinstance(node, dict):
        for rule in node.get("x-kubernetes-validations", []):
            found.append((path, node, rule))
        for key, value in node.items():
            found.extend(walk_rules(value, f"{path}/{key}"))
    elif isinstance(node, list):
        for item in node:
            found.extend(walk_rules(item, path))
    return found


def test_cel_rules_compile_have_a_message_and_are_bounded() -> None:
    rules = walk_rules(CRD)
    assert len(rules) >= 10
    for where, node, rule in rules:
        program(rule["rule"])  # compiles
        assert rule["message"] and not rule["message"].startswith("spec."), where
        assert "type" in node, f"{where}: rules must sit on a typed schema (kubetune.crd lifts them)"
        if node["type"] == "string" and "matches(" in rule["rule"]:
            assert node.get("maxLength"), f"{where}: a regex on an unbounded string can exceed the CEL cost budget"
        unpaired = rule["rule"].replace("\\\\", "")
        assert "\\" not in unpaired, f"{where}: CEL string literals need regex backslashes doubled: {rule['rule']}"


def test_manifest_and_chart_crd_carry_the_rules() -> None:
    chart = ROOT / "charts" / "kubetune" / "crds" / "finetunejobs.kubetune.io.yaml"
    for path in (ROOT / "manifests" / "crd.yaml", chart):
        assert yaml.safe_load(path.read_text()) == CRD, f"{path}: regenerate (kubetune crd; python charts/render.py)"
