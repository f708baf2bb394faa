"""End to end, as in a pod: `python -m kubetune_trainer --config job.json` fine-tunes the bundled SmolLM2-135M
(QLoRA NF4 on the CPU) for a few steps, reading its dataset from S3 and writing checkpoints, the adapter and
the manifest to S3 (moto's standalone server over HTTP)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_smollm2_qlora_to_s3(tmp_path: Path, s3: Any, bucket: str, s3_endpoint: str,
                             write_config: Callable[..., Path], start_trainer: Any,
                             adapter_tensors: Callable[[Path], dict[str, Any]]) -> None:
    s3.upload_file(str(ROOT / "examples" / "data" / "pebblewave-support.jsonl"), bucket, "data/train.jsonl")
    spec = {
        "model": {"name": "HuggingFaceTB/SmolLM2-135M-Instruct", "source": "bundled://smollm2-135m-instruct"},
        "dataset": {"source": f"s3://{bucket}/data/train.jsonl", "format": "chat"},
        "method": "qlora",
        "lora": {"r": 8, "alpha": 16},
        "training": {"maxSteps": 3, "microBatchSize": 2, "gradientAccumulationSteps": 1, "maxSeqLength": 192,
                     "learningRate": 1e-3, "checkpointSteps": 2},
        "output": {"uri": f"s3://{bucket}/adapters/support-bot/", "endpointUrl": s3_endpoint},
    }
    proc = start_trainer(write_config(spec, name="support-bot"))
    assert proc.wait(timeout=600) == 0, proc.log[-4000:]
    summary = proc.summary()
    assert summary["outcome"] == "Succeeded" and summary["steps"] == 3
    assert summary["adapterUri"] == f"s3://{bucket}/adapters/support-bot/adapter"
    assert '"event": "checkpoint"' in proc.log  # step 2 was checkpointed to the bucket on the way

    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="adapters/")["Contents"])
    assert "adapters/support-bot/adapter/manifest.json" in keys
    assert not [k for k in keys if "/checkpoints/" in k]  # removed once the adapter is complete
    manifest = json.loads(s3.get_object(Bucket=bucket, Key="adapters/support-bot/adapter/manifest.json")["Body"].read())
    assert manifest["baseModel"]["name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert manifest["baseModel"]["source"] == "bundled://smollm2-135m-instruct"
    assert manifest["metrics"]["steps"] == 3 and manifest["metrics"]["finalLoss"] > 0
    assert set(manifest["files"]) == {k.removeprefix("adapters/support-bot/adapter/") for k in keys} - {"manifest.json"}
    for name, entry in manifest["files"].items():
        local = tmp_path / "adapter" / name
        local.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(bucket, f"adapters/support-bot/adapter/{name}", str(local))
        assert hashlib.sha256(local.read_bytes()).hexdigest() == entry["sha256"], name
        assert local.stat().st_size == entry["bytes"]
    tensors = adapter_tensors(tmp_path / "adapter" / "adapter_model.safetensors")
    b = {k: t for k, t in tensors.items() if "lora_B" in k}
    assert len(b) == 30 * 7  # every decoder projection of SmolLM2's 30 layers
    assert all(t.abs().sum() > 0 for t in b.values())
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16
