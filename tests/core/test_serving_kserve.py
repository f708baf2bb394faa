"""The LLMInferenceService kubetune renders for an adapter is one KServe admits: the upstream CRD's schema
(vendored, tests/operator/data/README.md) and KServe's webhook rules for LoRA adapters."""

from __future__ import annotations

import gzip
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from kt_admission import admit  # kube-apiserver's checks of a custom resource

from kubetune.serving import kserve_manifest
from kubetune.spec import parse_spec

KSERVE_CRD = Path(__file__).parents[1] / "operator" / "data" / "serving.kserve.io_llminferenceservices-aaac4e29.yaml.gz"


@cache
def kserve_crd() -> dict[str, Any]:
    return dict(yaml.load(gzip.decompress(KSERVE_CRD.read_bytes()), Loader=yaml.CSafeLoader))


def lora_webhook(manifest: dict[str, Any]) -> list[str]:
    """KServe's ValidateLoRAAdapters (v1alpha2): adapters are schemaless in the CRD, the webhook checks them."""
    model = manifest["spec"]["model"]
    lora, base = model.get("lora") or {}, model.get("name") or manifest["metadata"]["name"]
    errors, seen = [], set()
    for i, adapter in enumerate(lora.get("adapters") or []):
        name = adapter.get("name")
        if not name:
            errors.append(f"spec.model.lora.adapters[{i}].name: adapter name is required")
        elif name in (".", ".."):
            errors.append(f"spec.model.lora.adapters[{i}].name: must not be '.' or '..'")
        elif name in seen:
            errors.append(f"spec.model.lora.adapters[{i}].name: duplicate name")
        elif name == base:
            errors.append(f"spec.model.lora.adapters[{i}].name: adapter name must differ from base model name")
        seen.add(name)
        if not str(adapter.get("uri", "")).startswith(("hf://", "s3://", "pvc://")):
            errors.append(f"spec.model.lora.adapters[{i}].uri: hf://, s3:// or pvc:// (KServe's LoRA schemes)")
    return errors


def job_spec(model: dict[str, Any], rank: int = 16) -> Any:
    return parse_spec({"model": model, "dataset": {"source": "s3://data/train.jsonl"},
                       "output": {"uri": "s3://models/run/", "serving": {"maxLoraRank": rank}}})


@pytest.mark.parametrize("model", [{"source": "bundled://smollm2-135m-instruct"},
                                   {"name": "meta-llama/Llama-3.1-8B-Instruct"},
                                   {"name": "meta-llama/Llama-3.1-8B-Instruct", "source": "s3://weights/llama/"}])
def test_the_manifest_passes_the_kserve_crd(model: dict[str, Any]) -> None:
    manifest = kserve_manifest("support-bot", "team-a", job_spec(model, 64), "s3://models/run/adapter/", gpus=2)
    assert manifest["apiVersion"] == "serving.kserve.io/v1alpha2"  # the storage version
    assert admit(kserve_crd(), manifest) == []
    assert lora_webhook(manifest) == []
    assert manifest["spec"]["model"]["lora"]["maxRank"] == 64


def test_the_schema_check_can_fail() -> None:
    manifest = kserve_manifest("support-bot", "team-a", job_spec({"name": "org/m"}), "s3://models/run/adapter/")
    del manifest["spec"]["model"]["uri"]
    manifest["spec"]["model"]["lora"]["maxRank"] = 0
    manifest["spec"]["model"]["lora"]["adapters"].append({"name": "support-bot", "uri": "gs://x"})
    manifest["spec"]["replicaz"] = 1
    errors = admit(kserve_crd(), manifest)
    assert any("spec.model.uri" in e for e in errors), errors
    assert any("maxRank" in e for e in errors), errors
    assert any("replicaz" in e for e in errors), errors
    assert len(lora_webhook(manifest)) == 2
