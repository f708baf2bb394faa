"""The resume key covers what changes the training trajectory, and only that: an OOM escalation that
re-plans the micro-batch split, checkpointing or the GPU class resumes from the checkpoint instead of
starting over at step 0."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from kubetune_trainer.loop import fingerprint

from kubetune.planning.plan import Knobs
from kubetune.spec import parse_spec
from kubetune.trainer_config import JobRef, TrainerConfig

SPEC = {"model": {"name": "kubetune-test/tiny-llama", "revision": "main"},
        "dataset": {"source": "/data/train.jsonl", "format": "chat"},
        "training": {"maxSteps": 10, "learningRate": 1e-3, "seed": 7},
        "output": {"uri": "/out"}}


def key(knobs: dict[str, Any] | None = None, commit: str | None = "a" * 40, gpu: str | None = "L4",
        **spec_changes: Any) -> str:
    raw = json.loads(json.dumps(SPEC))
    for dotted, value in spec_changes.items():
        node = raw
        *path, last = dotted.split("__")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    base = {"micro_batch_size": 2, "gradient_accumulation_steps": 4, "gradient_checkpointing": True,
            "max_seq_length": 512}
    config = TrainerConfig(job=JobRef(name="j"), spec=parse_spec(raw), knobs=Knobs(**{**base, **(knobs or {})}),
                           gpu_class=gpu, gpu_count=1)
    return fingerprint(config, commit)


def test_the_key_ignores_how_the_batch_is_split_and_where_it_runs() -> None:
    same = key()
    assert key({"micro_batch_size": 8, "gradient_accumulation_steps": 1}) == same
    assert key({"micro_batch_size": 1, "gradient_accumulation_steps": 8}) == same
    assert key({"gradient_checkpointing": False}) == same
    assert key({"compute_dtype": "float16"}) == same
    assert key(gpu="A100-80GB") == same
    assert key(training__checkpointSteps=3, training__loggingSteps=5) == same
    assert key(training__microBatchSize=8, training__gradientAccumulationSteps=1) == same
    assert key(model__tokenSecret={"name": "hf-token"}) == same


@pytest.mark.parametrize("change", [
    {"knobs": {"micro_batch_size": 2, "gradient_accumulation_steps": 8}},  # effective batch 16, not 8
    {"knobs": {"max_seq_length": 1024}},
    {"commit": "b" * 40},                        # `main` moved: other weights
    {"training__seed": 8}, {"training__learningRate": 2e-3}, {"training__maxSteps": 11},
    {"training__epochs": 2}, {"training__warmupRatio": 0.1}, {"training__lrScheduler": "linear"},
    {"training__packing": False}, {"lora__r": 32}, {"method": "lora"},
    {"dataset__source": "/data/other.jsonl"}, {"model__name": "kubetune-test/other"},
])
def test_the_key_changes_with_the_trajectory(change: dict[str, Any]) -> None:
    assert key(**change) != key()


@pytest.mark.slow
def test_resume_after_a_new_micro_batch_split_continues_from_the_checkpoint(
        tmp_path: Path, tiny_model_dir: Path, chat_file: Path, spec_for: Callable[..., dict[str, Any]],
        write_config: Callable[..., Path], start_trainer: Any, train_here: Any,
        adapter_tensors: Callable[[Path], dict[str, Any]]) -> None:
    """Attempt 1 runs micro-batch 2 x accumulation 2 and dies after a checkpoint; attempt 2 is re-planned
    to micro-batch 1 x accumulation 4 (as after an OOM) and resumes there, ending where an uninterrupted
    run ends."""
    out = tmp_path / "escalated"
    steps = 8
    first_spec = spec_for(tiny_model_dir, chat_file, str(out), maxSteps=steps, checkpointSteps=2)
    first = start_trainer(write_config(first_spec, name="escalated"))
    first.wait_for(lambda: (out / "checkpoints" / "step-00000002" / "COMPLETE").exists(), what="a checkpoint")
    first.kill(signal.SIGKILL)
    assert first.wait() == -signal.SIGKILL

    second_spec = spec_for(tiny_model_dir, chat_file, str(out), maxSteps=steps, checkpointSteps=2,
                           microBatchSize=1, gradientAccumulationSteps=4, gradientCheckpointing=True)
    second = train_here(write_config(second_spec, name="escalated"))
    assert second.code == 0, second.log[-3000:]
    resumed = [json.loads(line) for line in second.log.splitlines()
               if line.startswith("{") and '"event": "resume"' in line]
    assert resumed and resumed[0]["step"] >= 2, second.log[-3000:]
    assert "different spec" not in second.log
    assert second.summary["steps"] == steps

    reference = tmp_path / "reference"
    ref = train_here(write_config(spec_for(tiny_model_dir, chat_file, str(reference), maxSteps=steps,
                                           checkpointSteps=2), name="reference"))
    assert ref.code == 0, ref.log[-3000:]
    got = adapter_tensors(out / "adapter" / "adapter_model.safetensors")
    want = adapter_tensors(reference / "adapter" / "adapter_model.safetensors")
    for name in want:  # same rows per step, the loss summed in another order: float noise only
        torch.testing.assert_close(got[name], want[name], rtol=1e-3, atol=1e-4)
