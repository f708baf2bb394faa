from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.cli import main

BASE_JOB: dict[str, Any] = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "support-bot", "namespace": "team-a"},
    "spec": {
        "model": {"name": "meta-llama/Llama-3.1-8B-Instruct"},
        "dataset": {"source": "s3://datasets/support/train.jsonl", "format": "chat"},
        "method": "qlora",
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "targetModules": "all-linear"},
        "training": {"epochs": 1, "learningRate": 2.0e-4, "microBatchSize": "auto",
                     "gradientAccumulationSteps": 8, "maxSeqLength": 2048, "gradientCheckpointing": "auto"},
        "resources": {"gpuClass": "auto", "maxGpuClass": None, "gpuCount": "auto"},
        "output": {"uri": "s3://adapters/support-bot/", "credentialsSecret": "s3-credentials"},
    },
}


@pytest.fixture
def job() -> dict[str, Any]:
    return copy.deepcopy(BASE_JOB)


@pytest.fixture
def run_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """Run `kubetune plan -f FILE [args]` in-process on a document (dict, list of dicts, or raw text)."""

    def run(document: Any, *args: str) -> tuple[int, str, str]:
        path = tmp_path / "job.yaml"
        if isinstance(document, str):
            path.write_text(document)
        elif isinstance(document, list):
            path.write_text(yaml.safe_dump_all(document))
        else:
            path.write_text(yaml.safe_dump(document))
        code = main(["plan", "-f", str(path), *args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def set_path(doc: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """Set (or, with value DELETE, remove) a dotted path like 'spec.lora.r' in a job document."""
    keys = dotted.split(".")
    node = doc
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    if value is DELETE:
        node.pop(keys[-1], None)
    else:
        node[keys[-1]] = value
    return doc


DELETE = object()


@pytest.fixture
def with_value() -> Callable[[dict[str, Any], str, Any], dict[str, Any]]:
    return set_path


@pytest.fixture
def delete() -> object:
    return DELETE
