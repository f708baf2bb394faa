"""Every field of the FineTuneJob has a bad value here: `kubetune plan` exits 2 and names field + rule."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

BAD_VALUES: list[tuple[str, Any, str]] = [
    ("apiVersion", "kubetune.io/v1", "apiVersion: must be kubetune.io/v1alpha1; got 'kubetune.io/v1'"),
    ("kind", "Job", "kind: must be one of: FineTuneJob; got 'Job'"),
    ("metadata.name", "Support_Bot", "metadata.name: must be a DNS subdomain name"),
    ("metadata.namespace", "Team A", "metadata.namespace: must be a DNS label"),
    ("spec.model", {}, "spec.model: set name (a hub id) or source"),
    ("spec.model.name", "", "spec.model.name: must not be empty"),
    ("spec.model.source", "gs://models/llama", "spec.model.source: scheme 'gs' is not supported"),
    ("spec.model.source", "bundled://gpt-5", "spec.model.source: unknown bundled model 'bundled://gpt-5'; allowed: "
                                             "bundled://smollm2-135m-instruct"),
    ("spec.model.revision", "", "spec.model.revision: must not be empty"),
    ("spec.model.weights", "x",
     "spec.model.weights: unknown field; allowed fields here: name, source, revision, tokenSecret"),
    ("spec.model.tokenSecret.name", "HF Token", "spec.model.tokenSecret.name: must be a DNS subdomain name"),
    ("spec.model.tokenSecret.key", "a key", "spec.model.tokenSecret.key: must match"),
    ("spec.dataset.source", "s3://A_B/train.jsonl", "spec.dataset.source: s3 bucket name 'A_B' is not valid"),
    ("spec.dataset.format", "csv", "spec.dataset.format: must be one of: chat, alpaca, prompt-completion or text; "
                                   "got 'csv'"),
    ("spec.dataset.evalSource", "ftp://host/eval.jsonl", "spec.dataset.evalSource: scheme 'ftp' is not supported"),
    ("spec.dataset.evalFraction", 0.9, "spec.dataset.evalFraction: must be <= 0.5, got 0.9"),
    ("spec.method", "full", "spec.method: must be one of: qlora or lora; got 'full'"),
    ("spec.lora.r", -4, "spec.lora.r: must be >= 1, got -4"),
    ("spec.lora.alpha", 0, "spec.lora.alpha: must be >= 1, got 0"),
    ("spec.lora.dropout", 1.5, "spec.lora.dropout: must be < 1, got 1.5"),
    ("spec.lora.targetModules", [], "spec.lora.targetModules: must be 'all-linear' or a non-empty list"),
    ("spec.lora.targetModules", "all", "spec.lora.targetModules: must be 'all-linear' or a non-empty list"),
    ("spec.lora.modulesToSave", "lm_head", "spec.lora.modulesToSave: must be a list, got 'lm_head'"),
    ("spec.lora.modulesToSave", [""], "spec.lora.modulesToSave[0]: must not be empty"),
    ("spec.lora.rank", 8, "spec.lora.rank: unknown field; allowed fields here: r, alpha, dropout, targetModules"),
    ("spec.training.epochs", 0, "spec.training.epochs: must be > 0, got 0"),
    ("spec.training.maxSteps", 0, "spec.training.maxSteps: must be >= 1, got 0"),
    ("spec.training.learningRate", "fast", "spec.training.learningRate: must be a number, got 'fast'"),
    ("spec.training.learningRate", -1e-4, "spec.training.learningRate: must be > 0, got -0.0001"),
    ("spec.training.microBatchSize", 0, "spec.training.microBatchSize: must be 'auto' or an integer >= 1, got 0"),
    ("spec.training.gradientAccumulationSteps", 0, "spec.training.gradientAccumulationSteps: must be >= 1, got 0"),
    ("spec.training.maxSeqLength", 8, "spec.training.maxSeqLength: must be >= 32, got 8"),
    ("spec.training.gradientCheckpointing", "sometimes",
     "spec.training.gradientCheckpointing: must be one of: auto, true, false; got 'sometimes'"),
    ("spec.training.warmupRatio", 0.9, "spec.training.warmupRatio: must be <= 0.5, got 0.9"),
    ("spec.training.lrScheduler", "step", "spec.training.lrScheduler: must be one of: cosine, linear or constant"),
    ("spec.training.maxGradNorm", 0, "spec.training.maxGradNorm: must be > 0, got 0"),
    ("spec.training.optimizer", "sgd",
     "spec.training.optimizer: must be one of: paged_adamw_32bit, paged_adamw_8bit or adamw_torch; got 'sgd'"),
    ("spec.training.weightDecay", -0.1, "spec.training.weightDecay: must be >= 0, got -0.1"),
    ("spec.training.seed", -1, "spec.training.seed: must be >= 0, got -1"),
    ("spec.training.packing", "yes please", "spec.training.packing: must be true or false, got 'yes please'"),
    ("spec.training.loggingSteps", 0, "spec.training.loggingSteps: must be >= 1, got 0"),
    ("spec.training.checkpointSteps", 0, "spec.training.checkpointSteps: must be >= 1, got 0"),
    ("spec.training.batchSize", 4, "spec.training.batchSize: unknown field; allowed fields here: epochs, maxSteps"),
    ("spec.resources.gpuClass", "RTX-4090", "spec.resources.gpuClass: unknown GPU class 'RTX-4090'; allowed: auto, "
                                           "L4, A10G, A100-40GB, A100-80GB, H100-80GB, H200-141GB"),
    ("spec.resources.maxGpuClass", "TPU-v5", "spec.resources.maxGpuClass: unknown GPU class 'TPU-v5'; allowed:"),
    ("spec.resources.gpuCount", 16, "spec.resources.gpuCount: must be 'auto' or an integer from 1 to 8"),
    ("spec.resources.strategy", "pipeline", "spec.resources.strategy: must be one of: auto, ddp or fsdp; got "
                                            "'pipeline'"),
    ("spec.resources.maxGpuCount", 0, "spec.resources.maxGpuCount: must be >= 1, got 0"),
    ("spec.resources.maxGpuCount", "4", "spec.resources.maxGpuCount: must be an integer, got '4'"),
    ("spec.output", None, "spec.output: must be a mapping, got None"),
    ("spec.output.uri", "gs://bucket/x/", "spec.output.uri: scheme 'gs' is not supported"),
    ("spec.output.credentialsSecret", "S3 Creds", "spec.output.credentialsSecret: must be a DNS subdomain name"),
    ("spec.output.endpointUrl", "minio:9000", "spec.output.endpointUrl: must match ^https?://\\S+$, got 'minio:9000'"),
    ("spec.output.mergedModel", "perhaps", "spec.output.mergedModel: must be true or false, got 'perhaps'"),
    ("spec.evaluation", "yes", "spec.evaluation: must be a mapping, got 'yes'"),
    ("spec.evaluation.prompts", 5, "spec.evaluation.prompts: must be a list of non-empty prompts of at most 4000 "
                                   "characters, or the URI of a JSONL file (s3://bucket/key or a local path) whose "
                                   "lines carry a 'prompt' field; got 5"),
    ("spec.evaluation.prompts", ["ok", " "], "spec.evaluation.prompts: must be a list of non-empty prompts"),
    ("spec.evaluation.prompts", "gs://bucket/prompts.jsonl", "spec.evaluation.prompts: scheme 'gs' is not supported"),
    ("spec.evaluation.prompts", ["q"] * 9, "spec.evaluation.prompts: 9 prompts, more than maxAnswers (8); raise "
                                           "maxAnswers (at most 64) or drop prompts"),
    ("spec.evaluation.maxNewTokens", 0, "spec.evaluation.maxNewTokens: must be >= 1, got 0"),
    ("spec.evaluation.maxNewTokens", 4096, "spec.evaluation.maxNewTokens: must be <= 1024, got 4096"),
    ("spec.evaluation.maxAnswers", 65, "spec.evaluation.maxAnswers: must be <= 64, got 65"),
    ("spec.evaluation.maxAnswers", 0, "spec.evaluation.maxAnswers: must be >= 1, got 0"),
    ("spec.evaluation.compareBase", "yes", "spec.evaluation.compareBase: must be true or false, got 'yes'"),
    ("spec.evaluation.judge", "gpt", "spec.evaluation.judge: unknown field; allowed fields here: maxNewTokens, "
                                     "maxAnswers, prompts, compareBase"),
    ("spec.output.serving", "vllm", "spec.output.serving: must be a mapping, got 'vllm'"),
    ("spec.output.serving.maxLoraRank", 24, "spec.output.serving.maxLoraRank: must be one of vLLM's --max-lora-rank "
                                            "values: 1, 8, 16, 32, 64, 128, 256, 320, 512; got 24"),
    ("spec.output.serving.maxLoraRank", "16", "spec.output.serving.maxLoraRank: must be one of vLLM's "
                                              "--max-lora-rank values: 1, 8, 16, 32, 64, 128, 256, 320, 512; got '16'"),
    ("spec.queue", "Team Queue", "spec.queue: must be a DNS subdomain name"),
    ("spec.suspend", 5, "spec.suspend: must be true or false, got 5"),
    ("spec.priority", "high", "spec.priority: unknown field; allowed fields here: model, dataset, method, lora"),
]


@pytest.mark.parametrize(("path", "value", "message"), BAD_VALUES, ids=[f"{p}={v!r}" for p, v, _ in BAD_VALUES])
def test_bad_value_names_field_and_rule(run_plan, job, with_value, path, value, message) -> None:
    code, out, err = run_plan(with_value(job, path, value))
    assert code == 2, (out, err)
    assert message in err
    assert "Traceback" not in err
    assert out == ""


@pytest.mark.parametrize("path", ["spec.dataset.source", "spec.output.uri", "spec.dataset", "spec.output",
                                  "spec.model", "metadata.name", "spec"])
def test_missing_required_field(run_plan, job, with_value, delete, path) -> None:
    code, _, err = run_plan(with_value(job, path, delete))
    assert code == 2
    assert f"{path}: is required" in err


def test_every_spec_field_has_a_bad_value_case() -> None:
    """Adding a field to the spec without a bad-value case above fails here."""
    from kubetune.spec import FineTuneJobSpec

    covered = {p for p, _, _ in BAD_VALUES}

    def walk(model: type, prefix: str) -> list[str]:
        paths = []
        for name, field in model.model_fields.items():
            path = f"{prefix}.{field.alias or name}"
            paths.append(path)
            annotation = field.annotation
            sub = next((a for a in (getattr(annotation, "__args__", None) or (annotation,))
                        if isinstance(a, type) and hasattr(a, "model_fields")), None)
            if sub is not None:
                paths.extend(walk(sub, path))
        return paths

    leaves = [p for p in walk(FineTuneJobSpec, "spec") if not any(o.startswith(p + ".") for o in walk(
        FineTuneJobSpec, "spec"))]
    missing = [p for p in leaves if p not in covered]
    assert missing == []


def test_all_problems_are_reported_at_once(run_plan, job, with_value) -> None:
    with_value(job, "spec.lora.r", 0)
    with_value(job, "spec.training.maxSeqLength", 1)
    code, _, err = run_plan(job)
    assert code == 2
    assert "spec.lora.r: must be >= 1" in err and "spec.training.maxSeqLength: must be >= 32" in err


def test_pinned_class_too_small_names_the_smallest_that_fits(run_plan, job, with_value) -> None:
    with_value(job, "spec.model.name", "meta-llama/Llama-3.1-70B-Instruct")
    with_value(job, "spec.resources.gpuClass", "L4")
    with_value(job, "spec.resources.gpuCount", 1)
    code, _, err = run_plan(job)
    assert code == 2
    assert "spec.resources.gpuClass: L4 (20.7 GiB usable per GPU, 1 GPU(s)) cannot hold this job" in err
    assert "the cheapest that would hold it is 4x L4 FSDP" in err  # the cheapest shape per job (issue 12)


def test_max_gpu_class_too_low(run_plan, job, with_value) -> None:
    with_value(job, "spec.model.name", "meta-llama/Llama-3.1-70B-Instruct")
    with_value(job, "spec.resources.maxGpuClass", "A10G")
    with_value(job, "spec.resources.gpuCount", 1)
    code, _, err = run_plan(job)
    assert code == 2
    assert "spec.resources.gpuCount: 1 GPU(s) of any class cannot hold" in err or \
        "spec.resources.maxGpuClass: no class up to A10G holds this job" in err


def test_unknown_model_without_config(run_plan, job, with_value, monkeypatch) -> None:
    import socket

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed.getsockname()[1]}")  # nothing listens
    with_value(job, "spec.model.name", "acme/secret-model-9b")
    code, _, err = run_plan(job)
    # The hub does not answer: not the spec's fault, so exit 1 (retry), naming what to do instead.
    assert code == 1
    assert "spec.model: 'acme/secret-model-9b' is not in the catalog and the hub did not serve its config.json" in err
    assert "or point spec.model.source at a directory or s3:// prefix holding config.json" in err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("spec: [unclosed", "not valid YAML"),
        ("", "no FineTuneJob found (the file is empty)"),
        ("- 1\n- 2\n", "document: must be a mapping with apiVersion, kind, metadata, spec; got list"),
    ],
)
def test_unreadable_documents(run_plan, text, message) -> None:
    code, _, err = run_plan(text)
    assert code == 2
    assert message in err


def test_multi_document_errors_say_which_document(run_plan, job, with_value) -> None:
    bad = with_value(__import__("copy").deepcopy(job), "spec.lora.r", 0)
    code, _, err = run_plan([job, bad])
    assert code == 2
    assert "document 2: spec.lora.r: must be >= 1, got 0" in err


def test_real_process_exit_code_and_no_traceback(job, with_value, tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    import yaml

    path.write_text(yaml.safe_dump(with_value(job, "spec.lora.r", -4)))
    proc = subprocess.run([sys.executable, "-m", "kubetune.cli", "plan", "-f", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: spec.lora.r: must be >= 1, got -4"
