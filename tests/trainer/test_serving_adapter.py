"""The serving check in the trainer: a ready adapter is reported ready, loads with PEFT from S3 and answers as in
the pod; a rule broken is reported (never a silent pass); an adapter that targets nothing servable fails the job
before it trains (exit code 2)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from kubetune_trainer.__main__ import load_config
from kubetune_trainer.loop import RunOptions
from kubetune_trainer.progress import Log
from kubetune_trainer.runner import run_job

PROMPT = "What is the code word number 3?"


def run(config: Path, tmp_path: Path, **options: Any) -> tuple[int, Any, dict[str, Any]]:
    termination = tmp_path / f"termination-{config.stem}.json"
    code, result = run_job(load_config(str(config)), RunOptions(device="cpu", termination_log=str(termination),
                                                                **options), Log(fmt="json"))
    return code, result, json.loads(termination.read_text())


def test_the_adapter_in_s3_loads_with_peft_and_answers_as_in_the_pod(
        tmp_path: Path, tiny_model_dir: Path, chat_file: Path, spec_for: Callable[..., dict[str, Any]],
        write_config: Callable[..., Path], s3: Any, bucket: str, s3_endpoint: str) -> None:
    from kubetune_trainer.model import answer, compute_dtype, load_base, load_tokenizer
    from peft import PeftModel

    spec = spec_for(tiny_model_dir, chat_file, f"s3://{bucket}/runs/bot/", maxSteps=3, learningRate=3e-2)
    spec["output"]["endpointUrl"] = s3_endpoint
    spec["method"] = "lora"  # a 16-bit base: NF4 generation on a loaded 2-core CPU takes ~20 s per answer
    config = write_config(spec)
    code, result, summary = run(config, tmp_path, prompt=PROMPT)
    assert code == 0, summary
    assert summary["serving"] == []  # checked, every rule met
    pod_answer, base_answer = result.samples["after"], result.samples["before"]
    assert pod_answer != base_answer  # the adapter changes the answer: the comparison below can fail

    local = tmp_path / "downloaded"
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="runs/bot/adapter/")["Contents"]]
    for key in keys:
        target = local / key.removeprefix("runs/bot/adapter/")
        target.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(bucket, key, str(target))
    manifest = json.loads((local / "manifest.json").read_text())
    assert manifest["serving"] == []
    dtype = compute_dtype(torch.device("cpu"), load_config(str(config)).knobs.compute_dtype)
    base = load_base(tiny_model_dir, "lora", torch.device("cpu"), dtype)  # as the pod loaded it
    model = PeftModel.from_pretrained(base, str(local))
    assert answer(model, load_tokenizer(local), PROMPT, torch.device("cpu"), dtype=dtype) == pod_answer


def test_a_rank_above_max_lora_rank_is_reported(tmp_path: Path, tiny_model_dir: Path, chat_file: Path,
                                                spec_for: Callable[..., dict[str, Any]],
                                                write_config: Callable[..., Path]) -> None:
    out = tmp_path / "out"
    spec = spec_for(tiny_model_dir, chat_file, str(out), maxSteps=1)
    spec["lora"]["r"] = 32
    code, _, summary = run(write_config(spec), tmp_path)
    assert code == 0, summary  # the job succeeds: the adapter is fine for PEFT, the warning is about vLLM
    [finding] = summary["serving"]
    assert finding["rule"] == "RankAboveMax" and finding["severity"] == "Warning"
    assert "rank 32 is above spec.output.serving.maxLoraRank 16" in finding["message"]
    assert json.loads((out / "adapter" / "manifest.json").read_text())["serving"] == [finding]


def test_an_adapter_on_nothing_servable_fails_before_training(tmp_path: Path, tiny_model_dir: Path,
                                                              chat_file: Path, spec_for: Callable[..., dict[str, Any]],
                                                              write_config: Callable[..., Path]) -> None:
    out = tmp_path / "out"
    spec = spec_for(tiny_model_dir, chat_file, str(out), maxSteps=2)
    spec["lora"]["targetModules"] = ["embed_tokens"]
    code, _, summary = run(write_config(spec), tmp_path)
    assert code == 2
    assert summary["outcome"] == "InvalidInput" and summary["steps"] == 0
    assert summary["error"].startswith("spec.lora.targetModules: NothingServable: the adapter has no LoRA weight")
    assert not (out / "adapter").exists()


def test_kubetune_train_reports_the_serving_check(capsys: Any) -> None:
    from kubetune_trainer.local import report
    from kubetune_trainer.loop import Result

    from kubetune.contracts import ServingFinding

    finding = ServingFinding(rule="RankAboveMax", severity="Warning", message="LoRA rank 32 is above 16")
    for serving, line in (([], "Serving: ready to serve: the adapter meets every serving rule (vLLM, KServe)"),
                          ([finding], "Serving: Warning RankAboveMax: LoRA rank 32 is above 16")):
        report(Result(steps=3, final_loss=1.0, first_loss=2.0, adapter_uri="s3://b/a", serving=serving), None, 1.0)
        assert line in capsys.readouterr().out


def test_base_modules_from_the_config_or_the_loaded_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    from kubetune_trainer.model import load_base
    from kubetune_trainer.serving_check import base_modules
    from peft import LoraConfig, get_peft_model

    from kubetune.serving import LINEAR_CLASSES

    meta = base_modules(tiny_model_dir)
    assert meta["model.layers.1.self_attn.q_proj"] == "Linear" and meta["model.embed_tokens"] == "Embedding"
    peft_model = get_peft_model(load_base(tiny_model_dir, "lora", torch.device("cpu"), torch.float32),
                                LoraConfig(r=2, target_modules=["q_proj"]))
    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    loaded = base_modules(tmp_path, peft_model)  # transformers cannot build it: read off the loaded model
    assert LINEAR_CLASSES.search(loaded["model.layers.1.self_attn.q_proj"])
    assert set(meta) <= set(loaded)
