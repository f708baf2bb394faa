"""Real QLoRA training of a tiny random Llama: the adapter and manifest, determinism, resume after SIGKILL,
a checkpoint on SIGTERM, the hub-cache path, the merged model, and the exit codes."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from kubetune_trainer.__main__ import load_config
from kubetune_trainer.loop import RunOptions
from kubetune_trainer.progress import Log
from kubetune_trainer.runner import run_job


def run_inprocess(config: Path, tmp_path: Path, **options: Any) -> tuple[int, Any, dict[str, Any]]:
    termination = tmp_path / f"termination-{config.stem}.json"
    code, result = run_job(load_config(str(config)), RunOptions(device="cpu", termination_log=str(termination),
                                                                **options), Log(fmt="json"))
    return code, result, json.loads(termination.read_text())


def check_adapter(folder: Path, adapter_tensors: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    manifest = json.loads((folder / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == entry["sha256"], name
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= set(manifest["files"])
    tensors = adapter_tensors(folder / "adapter_model.safetensors")
    b_matrices = [t for k, t in tensors.items() if "lora_B" in k]
    assert b_matrices and all(t.abs().sum() > 0 for t in b_matrices)  # LoRA B starts at zero: it trained
    return manifest


def test_qlora_run_writes_adapter_manifest_and_summary(tmp_path: Path, tiny_model_dir: Path, chat_file: Path,
                                                       spec_for: Callable[..., dict[str, Any]],
                                                       write_config: Callable[..., Path],
                                                       adapter_tensors: Callable[[Path], dict[str, Any]]) -> None:
    out = tmp_path / "out"
    spec = spec_for(tiny_model_dir, chat_file, str(out), maxSteps=4)
    spec["dataset"]["evalFraction"] = 0.25
    code, result, summary = run_inprocess(write_config(spec), tmp_path)
    assert code == 0, summary
    manifest = check_adapter(out / "adapter", adapter_tensors)
    assert manifest["metrics"]["steps"] == 4
    assert manifest["baseModel"]["source"] == str(tiny_model_dir)
    assert manifest["spec"]["training"]["maxSteps"] == 4
    assert summary["outcome"] == "Succeeded" and summary["steps"] == 4
    assert summary["adapterUri"] == str(out / "adapter")
    assert summary["finalLoss"] > 0 and summary["peakMemoryBytes"] > 0
    assert summary["evalLoss"] is not None and result.eval_loss == summary["evalLoss"]
    assert not (out / "checkpoints").exists()  # only the result stays once it is complete


def test_same_seed_same_adapter(tmp_path: Path, tiny_model_dir: Path, chat_file: Path,
                                spec_for: Callable[..., dict[str, Any]], write_config: Callable[..., Path],
                                adapter_tensors: Callable[[Path], dict[str, Any]]) -> None:
    runs = []
    for name in ("a", "b"):
        spec = spec_for(tiny_model_dir, chat_file, str(tmp_path / name), maxSteps=3)
        spec["lora"]["dropout"] = 0.1  # dropout draws random numbers: the seed must cover them too
        assert run_inprocess(write_config(spec, name=name), tmp_path)[0] == 0
        runs.append(adapter_tensors(tmp_path / name / "adapter" / "adapter_model.safetensors"))
    assert runs[0].keys() == runs[1].keys()
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), key


def test_sigkill_then_restart_resumes_and_matches(tmp_path: Path, tiny_model_dir: Path, chat_file: Path,
                                                  spec_for: Callable[..., dict[str, Any]],
                                                  write_config: Callable[..., Path], start_trainer: Any,
                                                  train_here: Any,
                                                  adapter_tensors: Callable[[Path], dict[str, Any]]) -> None:
    out = tmp_path / "killed"
    steps = 12
    spec = spec_for(tiny_model_dir, chat_file, str(out), maxSteps=steps, checkpointSteps=3)
    config = write_config(spec, name="killed")
    first = start_trainer(config)
    first.wait_for(lambda: (out / "checkpoints" / "step-00000003" / "COMPLETE").exists(), what="a checkpoint")
    first.kill(signal.SIGKILL)
    assert first.wait() == -signal.SIGKILL
    assert not (out / "adapter" / "manifest.json").exists(), "the first run finished before the kill"

    second = train_here(config)
    assert second.code == 0, second.log[-3000:]
    assert '"event": "resume"' in second.log and "resumed from" in second.log
    resumed_at = [json.loads(line)["step"] for line in second.log.splitlines()
                  if line.startswith("{") and '"event": "resume"' in line and '"step"' in line]
    assert resumed_at and 3 <= resumed_at[0] < steps
    summary = second.summary
    assert summary["outcome"] == "Succeeded" and summary["steps"] == steps
    manifest = check_adapter(out / "adapter", adapter_tensors)
    assert manifest["metrics"]["steps"] == steps

    # the uninterrupted run reaches the same weights: data position, optimizer, scheduler and RNG all resumed
    ref_out = tmp_path / "reference"
    ref = spec_for(tiny_model_dir, chat_file, str(ref_out), maxSteps=steps, checkpointSteps=3)
    assert run_inprocess(write_config(ref, name="killed"), tmp_path)[0] == 0
    got = adapter_tensors(out / "adapter" / "adapter_model.safetensors")
    want = adapter_tensors(ref_out / "adapter" / "adapter_model.safetensors")
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5)


def test_sigterm_writes_a_checkpoint_first(tmp_path: Path, tiny_model_dir: Path, chat_file: Path,
                                           spec_for: Callable[..., dict[str, Any]],
                                           write_config: Callable[..., Path], start_trainer: Any) -> None:
    out = tmp_path / "preempted"
    spec = spec_for(tiny_model_dir, chat_file, str(out), maxSteps=100000, checkpointSteps=100000)
    proc = start_trainer(write_config(spec, name="preempted"))
    proc.wait_for(lambda: '"event": "step"' in proc.log, what="the first step")
    proc.kill(signal.SIGTERM)
    assert proc.wait() == 143, proc.log[-3000:]
    summary = proc.summary()
    assert summary["outcome"] == "Preempted" and summary["steps"] >= 1
    marker = out / "checkpoints" / f"step-{summary['steps']:08d}" / "COMPLETE"
    assert marker.exists(), sorted(p.name for p in (out / "checkpoints").iterdir())
    assert json.loads(marker.read_text())["step"] == summary["steps"]
    assert {"adapter_model.safetensors", "trainer_state.pt", "state.json"} <= {p.name for p in marker.parent.iterdir()}


def test_hub_id_offline_loads_from_the_hugging_face_cache(tmp_path: Path, tiny_model_dir: Path, chat_file: Path,
                                                  spec_for: Callable[..., dict[str, Any]],
                                                  write_config: Callable[..., Path],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    hub = tmp_path / "hub"
    repo = hub / "models--kubetune-test--tiny-llama"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    spec = spec_for(tiny_model_dir, chat_file, str(tmp_path / "out"), maxSteps=1)
    spec["model"] = {"name": "kubetune-test/tiny-llama"}
    code, _, summary = run_inprocess(write_config(spec), tmp_path)
    assert code == 0, summary
    spec["model"] = {"name": "kubetune-test/not-cached"}
    code, _, summary = run_inprocess(write_config(spec), tmp_path)
    assert code == 2 and summary["outcome"] == "InvalidInput"
    assert "'kubetune-test/not-cached' is not in the model cache and downloads are off" in summary["error"]


def test_lora_method_with_merged_model(tmp_path: Path, tiny_model_dir: Path, chat_file: Path,
                                       spec_for: Callable[..., dict[str, Any]], write_config: Callable[..., Path],
                                       adapter_tensors: Callable[[Path], dict[str, Any]]) -> None:
    out = tmp_path / "merged-run"
    spec = spec_for(tiny_model_dir, chat_file, str(out), maxSteps=2)
    spec["method"] = "lora"
    spec["output"]["mergedModel"] = True
    code, _, summary = run_inprocess(write_config(spec), tmp_path)
    assert code == 0, summary
    manifest = check_adapter(out / "adapter", adapter_tensors)
    merged = manifest["merged"]["files"]
    assert "config.json" in merged and "model.safetensors" in merged
    for name, entry in merged.items():
        assert hashlib.sha256((out / "merged" / name).read_bytes()).hexdigest() == entry["sha256"]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out / "merged"))
    assert not any("lora" in name for name, _ in model.named_parameters())


def test_bad_data_exits_2_before_loading_the_model(tmp_path: Path, tiny_model_dir: Path,
                                                    spec_for: Callable[..., dict[str, Any]],
                                                    write_config: Callable[..., Path], train_here: Any) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
                   '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]}\n')
    run = train_here(write_config(spec_for(tiny_model_dir, bad, str(tmp_path / "out"))))
    assert run.code == 2
    assert run.summary["outcome"] == "InvalidInput"
    assert "bad.jsonl line 2: field 'messages[1].content' must be a string, got NoneType" in run.summary["error"]
    assert '"ts"' in run.log and '"event": "model"' not in run.log  # JSON lines; none before a model (GPU) time


def test_missing_bucket_exits_4(tmp_path: Path, tiny_model_dir: Path, chat_file: Path, s3_endpoint: str,
                                spec_for: Callable[..., dict[str, Any]], write_config: Callable[..., Path],
                                train_here: Any, s3: Any) -> None:  # s3: the credentials and endpoint in the env
    run = train_here(write_config(spec_for(tiny_model_dir, chat_file, "s3://kubetune-missing-bucket/jobs/x/")))
    assert run.code == 4
    assert run.summary["outcome"] == "StorageError"
    assert "bucket 'kubetune-missing-bucket' does not exist" in run.summary["error"]


def test_wrong_credentials_exit_4(tmp_path: Path, tiny_model_dir: Path, chat_file: Path, auth_s3_endpoint: str,
                                  spec_for: Callable[..., dict[str, Any]], write_config: Callable[..., Path],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", auth_s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    code, _, summary = run_inprocess(write_config(spec_for(tiny_model_dir, chat_file, "s3://adapters/x/")), tmp_path)
    assert code == 4 and summary["outcome"] == "StorageError"
    assert summary["error"].startswith("s3://adapters/x: cannot access the bucket")


def test_unreadable_config_exits_2(tmp_path: Path) -> None:
    from kubetune_trainer.__main__ import main

    bad = tmp_path / "job.json"
    bad.write_text(json.dumps({"job": {"name": "x"}, "spec": {"model": {}}, "knobs": {}}))
    termination = tmp_path / "t.json"
    assert main(["--config", str(bad), "--metrics-port", "0", "--termination-log", str(termination)]) == 2
    error = json.loads(termination.read_text())["error"]
    assert "config.spec.model" in error and "config.knobs.microBatchSize: is required" in error


def test_kubetune_train_cli_plans_and_trains_here(tmp_path: Path, tiny_model_dir: Path, chat_file: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from kubetune.cli import main

    job = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
           "metadata": {"name": "local-run", "annotations": {"kubetune.io/sample-prompt": "What is the code word 3?"}},
           "spec": {"model": {"source": str(tiny_model_dir)}, "dataset": {"source": str(chat_file)},
                    "lora": {"r": 4}, "training": {"maxSeqLength": 128, "gradientAccumulationSteps": 2},
                    "output": {"uri": "s3://not-used/when-overridden"}}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    out = tmp_path / "local-out"
    termination = tmp_path / "summary.json"
    code = main(["train", "-f", str(path), "--output", str(out), "--max-steps", "2", "--device", "cpu",
                 "--termination-log", str(termination)])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"Adapter: {out / 'adapter'}" in printed
    assert "Prompt: What is the code word 3?" in printed and "before:" in printed and "after:" in printed
    assert json.loads(termination.read_text())["steps"] == 2
    assert (out / "adapter" / "manifest.json").exists()
    assert main(["train", "-f", str(path), "--max-steps", "0"]) == 2
    assert "--max-steps: must be >= 1, got 0" in capsys.readouterr().err
