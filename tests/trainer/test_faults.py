"""KUBETUNE_FAULT_OOM_AT_STEP takes the trainer's real out-of-memory path: exit 3, the OOM summary, and the
checkpoint written before it is resumed by the next attempt."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kubetune_trainer.faults import KILL_AT_STEP, OOM_AT_STEP, fault_step, oom_step


def test_oom_at_step_k_exits_3_and_the_next_attempt_resumes(tmp_path: Path, tiny_model_dir: Path, chat_file: Path,
                                                           spec_for: Callable[..., dict[str, Any]],
                                                           write_config: Callable[..., Path],
                                                           start_trainer: Any, train_here: Any) -> None:
    spec = spec_for(tiny_model_dir, chat_file, str(tmp_path / "out"), maxSteps=4, checkpointSteps=2)
    config = write_config(spec, name="oom")
    first = start_trainer(config, env={OOM_AT_STEP: "3"})
    assert first.wait(timeout=300) == 3, first.log[-3000:]
    summary = first.summary()
    assert summary["outcome"] == "OutOfMemory" and summary["exitCode"] == 3 and summary["steps"] == 2
    assert summary["error"].startswith("out of GPU memory at step 2") and OOM_AT_STEP in summary["error"]
    second = train_here(config)
    assert second.code == 0, second.log[-3000:]
    assert "at step 2/4" in second.log and second.summary["steps"] == 4


def test_the_variable_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(OOM_AT_STEP, raising=False)
    assert oom_step() is None
    monkeypatch.setenv(OOM_AT_STEP, "0")
    with pytest.raises(ValueError, match=f"{OOM_AT_STEP}='0': expected a step number >= 1"):
        oom_step()
    monkeypatch.setenv(KILL_AT_STEP, "x")
    with pytest.raises(ValueError, match=f"{KILL_AT_STEP}='x': expected a step number >= 1"):
        fault_step(KILL_AT_STEP)
